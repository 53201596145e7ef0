"""The agent's exception tree: one root, one branch per kind of failure.

    AgentError
    ├── ConfigError        a setting the agent cannot use          (exit 2)
    │                      (also a bad token file or message file: TokenFileError, MessageFileError)
    ├── PluginError        extractor not found or not loadable     (exit 3)
    ├── SourceError        the work source (broker, relay, spool)
    │   └── BrokerError    the backend is gone or unreachable      (exit 4)
    ├── ClowderError       Clowder (or the relay on its behalf) failed a call
    ├── MessageError       one message no extractor can process
    └── ProtocolError      a frame between the agent and its extractor processes is broken

Each module keeps its own precise class (TokenFileError, SourceLost, ...) under one of these
branches, so callers catch the kind and the CLI maps kinds, never built-in types, to exit codes.
Some classes keep their old built-in base too (ValueError, EOFError): existing callers catch them by it.
"""
from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError, ValueError):
    """A setting has a value the agent cannot use; the message says which, from where and why."""


class PluginError(AgentError):
    """A plugin cannot be found or loaded; the message says what to fix."""


class SourceError(AgentError):
    """A work source failed (broker, relay, spool folder or message file)."""


class BrokerError(SourceError):
    """The work source's backend (RabbitMQ, the relay) cannot be used for now."""


class ClowderError(AgentError):
    """A call to Clowder (direct, through the relay or recorded in the spool) failed."""


class MessageError(AgentError, ValueError):
    """One message cannot be processed by any extractor."""


class ProtocolError(AgentError, EOFError):
    """The agent and an extractor process disagree on the wire (or one went away mid-frame)."""
