"""Work sources: where an agent's messages come from (AMQP now; the relay and spool later)."""
