"""The launcher's exception tree: one root, one branch per kind of failure.

    LauncherError
    ├── ConfigError       a setting, the caps file or a request is unusable        exit 2
    │   ├── CapsError (caps.py), RelayConfigError (relay/main.py)
    │   └── RequestError  a job request the scheduler must not get (bad name, < 1 task)
    ├── LedgerError       the ledger file is unusable                               exit 2
    ├── Refused (operations.py)  the caps allow none of the request                 exit 3
    ├── LockedError (cli.py)     another launcher holds the state directory's lock  exit 4
    ├── ServiceError      a service the launcher drives failed                      exit 1
    │   ├── SchedulerError  (SubmitFailed, QueryFailed in schedulers/base.py)
    │   ├── CommandError    (runner.py: a local or SSH command failed, CommandTimeout)
    │   ├── BrokerError     RabbitMQ could not be queried
    │   └── SpoolFSError    (relay/spool_fs.py: a spool file operation failed)
    └── RelayError        a relay or spool answer to one request (ClientError, replay; hpc_common.routes.Refusal is caught where raised)

launcher.cli maps these branches to exit codes; a built-in exception reaching it is a bug and
keeps its traceback. Classes that callers catch by a built-in type keep that base too
(RequestError is a ValueError, SpoolFSError an OSError).
"""
from __future__ import annotations


class LauncherError(Exception):
    """Root of every error the launcher raises on purpose."""


class ConfigError(LauncherError):
    """A setting is missing or wrong; the message names the setting and where it came from."""


class RequestError(ConfigError, ValueError):
    """A job request the launcher refuses to hand to the scheduler (bad name, count or walltime)."""


class LedgerError(LauncherError):
    """The ledger file is unusable (e.g. written by a newer launcher)."""


class ServiceError(LauncherError):
    """A service the launcher drives (scheduler, command, broker, remote spool) failed."""


class SchedulerError(ServiceError):
    """A scheduler command failed or printed something we cannot trust."""


class BrokerError(ServiceError):
    """The broker could not be queried (message already redacted)."""


class RelayError(LauncherError):
    """The relay or the spool cannot serve one request; handled where it is raised."""
