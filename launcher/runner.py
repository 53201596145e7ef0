"""Run scheduler commands as argv lists, locally or on a login node over OpenSSH.

Never ``shell=True``. Every failure raises :class:`CommandError` carrying the argv, exit code,
stdout and stderr. Over SSH the argv is quoted with :func:`shlex.join` and sent after ``--``;
the connection is multiplexed (ControlMaster) and strict about host keys. Nothing secret is ever
put in an argv: the environment of a remote command is whatever the login shell gives it.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path
from typing import Mapping, Optional, Sequence

from launcher.errors import ConfigError, ServiceError

DEFAULT_TIMEOUT = 60.0


class CommandError(ServiceError):
    """A command failed to start, exited non-zero, or timed out."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: Optional[int],
        stdout: str = "",
        stderr: str = "",
        reason: str = "",
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason or f"exit code {returncode}"
        detail = (stderr or stdout).strip().splitlines()
        tail = f": {detail[-1]}" if detail else ""
        super().__init__(f"{shlex.join(self.argv)} failed ({self.reason}){tail}")


class CommandTimeout(CommandError):
    """The command did not finish within its timeout (it was killed)."""


@dataclasses.dataclass(frozen=True)
class Result:
    """Output of a command that exited 0 (or whose exit code the caller accepted)."""

    argv: list
    returncode: int
    stdout: str
    stderr: str


class Runner:
    """Runs argv lists on the machine where the scheduler commands live."""

    description = "runner"

    def command(self, argv: Sequence[str]) -> list:
        """The argv actually executed locally for ``argv`` (identity for the local runner)."""
        return list(argv)

    def run(
        self,
        argv: Sequence[str],
        timeout: float = DEFAULT_TIMEOUT,
        input: Optional[str] = None,
        check: bool = True,
        env: Optional[Mapping[str, str]] = None,
    ) -> Result:
        """Run ``argv``; raise CommandError on non-zero exit (when ``check``) or timeout."""
        if not argv:
            raise ValueError("empty argv")
        full = self.command(argv)
        try:
            proc = subprocess.run(
                full,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=dict(env) if env is not None else None,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(
                argv, None, _text(exc.stdout), _text(exc.stderr), f"timed out after {timeout:g} s"
            ) from None
        except OSError as exc:
            raise CommandError(argv, None, "", str(exc), f"could not start: {exc.strerror}") from None
        if check and proc.returncode != 0:
            raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
        return Result(list(argv), proc.returncode, proc.stdout, proc.stderr)

    def which(self, name: str) -> bool:
        """True when ``name`` is a command on the target's PATH."""
        try:
            self.run(["sh", "-c", 'command -v "$0" >/dev/null', name], timeout=30)
        except CommandError:
            return False
        return True


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


class LocalRunner(Runner):
    """Runs commands on this machine (the launcher lives on the login node)."""

    description = "local"


class SSHRunner(Runner):
    """Runs commands on a login node through the OpenSSH client.

    BatchMode (no password prompts), host key checking on, one multiplexed master connection
    reused by every command (ControlPersist keeps it for ``persist`` seconds after the last use).
    Site specifics (port, user, key, known_hosts) belong in ``~/.ssh/config`` or in the file
    given as ``config_file`` (ssh -F).
    """

    def __init__(
        self,
        host: str,
        control_dir: Path,
        persist: int = 300,
        config_file: Optional[Path] = None,
        ssh: str = "ssh",
        connect_timeout: int = 15,
    ) -> None:
        if not host or host.startswith("-"):
            raise ConfigError(f"bad ssh host {host!r}")
        self.host = host
        self.control_dir = Path(control_dir)
        self.persist = persist
        self.config_file = config_file
        self.ssh = ssh
        self.connect_timeout = connect_timeout
        self.description = f"ssh {host}"

    def options(self) -> list:
        """The ssh options used for every command."""
        self.control_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        opts = []
        if self.config_file is not None:
            opts += ["-F", str(self.config_file)]
        opts += [
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "ControlMaster=auto",
            # %C: hash of local host, remote host, port and user: short enough for a socket path.
            "-o", f"ControlPath={self.control_dir}/%C",
            "-o", f"ControlPersist={self.persist}",
            "-o", f"ConnectTimeout={self.connect_timeout}",
            "-o", "ServerAliveInterval=15",
        ]
        return opts

    def command(self, argv: Sequence[str]) -> list:
        return [self.ssh, *self.options(), self.host, "--", shlex.join(argv)]

    def close(self) -> None:
        """Stop the master connection, if any (``ssh -O exit``)."""
        try:
            subprocess.run(
                [self.ssh, *self.options(), "-O", "exit", self.host],
                capture_output=True,
                timeout=15,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            pass


def default_control_dir() -> Path:
    """A private directory for ssh control sockets (short path: sockets have a 104-byte limit)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base) / f"clowder-launcher-ssh-{os.getuid()}"
