"""Exit codes of `python -m agent`, meaningful to a batch scheduler and to the launcher.

0 means the agent ended on purpose (queue drained, idle, message budget, walltime drain,
SIGTERM with work handed back): the scheduler should record the task COMPLETED.
Non-zero codes say why the agent could not do its job, so nobody resubmits it blindly.
"""
OK = 0
INTERNAL_ERROR = 1
CONFIG_ERROR = 2        # bad settings or command line
PLUGIN_ERROR = 3        # extractor not found or failed to load
BROKER_UNREACHABLE = 4  # work source unreachable after the configured retries
LOCAL_FAILURES = 5      # `agent local`: some files failed
NO_SCRATCH = 6          # this node's scratch disk cannot hold the files: work handed back
MESSAGE_NOT_DONE = 7    # source file: the message was not processed (retry or dead-letter it)


def for_error(exc: BaseException) -> int:
    """The exit code for an error of the agent's tree (agent.errors), by its kind."""
    from .errors import BrokerError, ConfigError, PluginError

    if isinstance(exc, ConfigError):
        return CONFIG_ERROR
    if isinstance(exc, PluginError):
        return PLUGIN_ERROR
    if isinstance(exc, BrokerError):
        return BROKER_UNREACHABLE
    return INTERNAL_ERROR
