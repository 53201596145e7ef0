"""The work relay: agents on compute nodes that reach only the login node (or the extractor VM).

    python -m launcher relay --bind HOST:PORT --token-file FILE [--cert C --key K]
    (broker from RABBITMQ_URI, queue from RABBITMQ_QUEUE)

An HTTP service that takes messages from RabbitMQ and leases them to agents running with
`source: relay`, and forwards the Clowder API calls their extractors make. An agent then needs
to reach the relay and nothing else. The work API both sides speak (paths, request and answer
records, limits, features) is defined once, in hpc_common.relay_api.

Leases and durability (launcher.relay.store, launcher.relay.broker)
  The relay `basic_get`s a batch from the queue, records it in a SQLite lease table (WAL, fsync'd
  commit) in its state folder, then acknowledges it to RabbitMQ. From then on the table is the
  message's only copy, so RabbitMQ's consumer_timeout never applies to long work. Only a bounded
  number of unleased rows is kept (`--buffer`): the relay does not drain the queue into SQLite.
  An agent leases rows (long poll) for `--lease-ttl` seconds (default 15) and extends them by
  heartbeat every ttl/4, so a lease outlives a node stall of about 3/4 ttl and a dead agent's
  leases return within ttl (+1 s) of its last heartbeat; an idle agent stays while GET
  /v1/backlog says work will be leasable soon (a retry's backoff, a stale lease):
    complete     -> the row is deleted (the results are in Clowder); an agent sends it with its
                    next lease call (one round trip per file), or on its own when idle;
    release      -> leasable again at once (hand back, not a failure);
    fail         -> attempts+1; leasable after a backoff, or past `--max-retries` dead;
    dead-letter  -> dead at once, with the agent's reason and traceback;
    expiry       -> a lease not extended for lease_ttl returns within ~1 s (reaper) and counts
                    as a failed attempt (an agent that keeps dying on a file ends its retries);
    dead rows    -> published to `error.<queue>` with the original body and properties plus
                    `x-error-reason`/`x-error-traceback`, publisher-confirmed, then deleted.
  Leases survive a relay restart (the table is on disk; on start every live lease gets one more
  lease_ttl so agents can reconnect). kill -9 of the relay loses nothing: a message is either
  still unacknowledged in RabbitMQ or committed in the table (a crash between the two makes a
  duplicate, never a loss). Only the insert before the ack is fsync'd against power loss; the
  other changes can only roll back to a state that runs a message again. At shutdown the rows not
  leased are handed back to RabbitMQ (confirmed); leased ones wait for the next start.
  One relay per queue and state folder (a lock file enforces the folder); several relays on
  one queue also work, each holding its own small buffer.

Forwarding without an open proxy (launcher.relay.forward, hpc_common.routes)
  A leased body is handed out with `host` = `<relay URL>/clowder/<lease id>/` and `secretKey` =
  a key of the relay's own (an HMAC of a relay secret, the agent and the real key: worthless
  without a live lease id of that agent); the real host and key stay in the table. Calls to
  `/clowder/<lease id>/api/...` are forwarded only while the lease is live, only with its key,
  only for the API routes pyclowder calls and only for the lease's own file, dataset and the
  ids its own calls created or listed, and only to the lease's own Clowder host, with the real
  key put back (v1 `?key=`, v2 `X-API-KEY`). Bodies stream both ways (`--max-upload` bounds
  uploads); the relay URL pyclowder writes into metadata is replaced by the real host.
  Small files inline (launcher.relay.inline): an agent that stages ahead asks for files up to a
  size with its leases; the relay then makes the file-info and download requests pyclowder would
  make for each file message, through the same checks, and sends the answers in the lease item,
  so the extractor's first two calls never cross the relay while it waits.
  Status messages the agent POSTs go to the lease's reply_to with its correlation_id; the
  relay registers the extractor on the `extractors` exchange for the agent, and on its own
  every `--heartbeat` seconds (default 60) while agents call it.

Serving and scale (launcher.relay.server, launcher.relay.longpoll)
  aiohttp on one event loop (uvloop's when installed): a connection costs a socket and a small
  buffer, not a thread, and a waiting long poll is a future in one FIFO queue that a single task
  serves as rows become leasable. SQLite commits run in a 4-thread pool, pika stays on the broker
  thread. `--max-connections` (default 1024) caps open connections; one more gets a 503 (raise it
  for big machines: an agent keeps about six open; the relay lifts its open-files limit to fit).
  benchmarks/relay_load.py drives 2,000 agent connections against this relay and the earlier
  thread-per-connection one side by side (benchmarks/results/relay_load.md). On the shared
  2-core machine (2026-12-02 15:42) this relay held all 2,000 without an error at 11.0x the
  earlier relay's files/s (646 vs 59) and 13.6x its files per CPU second (1.32 ms of relay CPU
  per file vs 17.95 ms: about 750 files/s per core), where the earlier one saw 4,538 disconnects.
  With one or two real agents (benchmarks/results/relay_throughput.md, 2026-12-02 16:16) the relay
  costs 0.74-1.17 ms of CPU per file on a core of its own and the relay path runs at 0.91-1.20x
  direct AMQP (0.58-0.78x without stage-ahead): with the file info and small file inline, only the
  metadata POST is forwarded while the extractor waits, 0.31 ms longer than straight to Clowder,
  0.19 ms of it relay CPU (benchmarks/results/relay_forward_cost.md; the upstream leg on
  launcher.relay.upstream).
  One relay process uses one core at most (the GIL). If that core is the limit, run several relay
  processes on the login node, each on its own port and with its own --state-dir (the lock file
  allows one relay per state folder), all on the same queue (each takes its own small buffer),
  and point each group of agents at one of them (AGENT_RELAY_URL per job array, e.g. by array
  index). Do not share one port between relays with SO_REUSEPORT: a lease lives in the process
  that granted it, and the kernel would send an agent's next connection (its heartbeat, its
  completion, its extractor's Clowder calls) to any of them.

Security
  Every work-API request carries `Authorization: Bearer <token>` (token read from a file that
  must be mode 0600, compared in constant time); Clowder calls carry their per-lease key. TLS
  when --cert/--key are given; an explicit --bind address (no default); bounded request sizes;
  clear JSON 4xx errors. Tokens and keys never appear in logs, argv or error messages.
"""
