"""The SSH path against a real OpenSSH server on loopback, with a throwaway key and host key."""
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import services
from launcher.runner import CommandError, SSHRunner

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A private sshd on 127.0.0.1 accepting one throwaway key; yields an ssh -F config file."""
    if not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        if IN_CI:
            pytest.fail("OpenSSH server/client missing and CI=true (scripts/install.sh installs it)")
        pytest.skip("OpenSSH server/client not installed")
    d = tmp_path_factory.mktemp("sshd")
    d.chmod(0o700)
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\nStrictModes no\n"
        f"PidFile {d}/sshd.pid\nPermitRootLogin prohibit-password\nMaxSessions 20\n"
        "MaxStartups 20\nAcceptEnv NOTHING\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir sshd needs
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "w"))
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    config = d / "ssh_config"
    config.write_text(
        f"Host loginnode\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n"
        f"  IdentityFile {d}/user_key\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {d}/known_hosts\n  GlobalKnownHostsFile /dev/null\n"
        "  LogLevel ERROR\n"
        f"Host strangerhost\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n"
        f"  IdentityFile {d}/user_key\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {d}/empty_known_hosts\n  GlobalKnownHostsFile /dev/null\n")
    if not services.wait_for_port("127.0.0.1", port):
        proc.kill()
        pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}")
    try:
        yield config, d
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def runner(sshd, tmp_path):
    config, _ = sshd
    r = SSHRunner("loginnode", Path("/tmp") / f"lt-ssh-{os.getpid()}-{tmp_path.name[-6:]}",
                  config_file=config, persist=30)
    yield r
    r.close()


def test_argv_is_quoted_exactly(runner):
    args = ["printf", "%s|", "two words", "it's", '"dq"', "$HOME", "a;b", "*", ""]
    assert runner.run(args).stdout == "two words|it's|\"dq\"|$HOME|a;b|*||"


def test_errors_carry_exit_code_and_stderr(runner):
    with pytest.raises(CommandError) as info:
        runner.run(["sh", "-c", "echo out; echo oops >&2; exit 7"])
    assert info.value.returncode == 7
    assert info.value.stdout == "out\n" and info.value.stderr == "oops\n"


def test_connection_is_multiplexed(runner, sshd):
    config, d = sshd
    runner.run(["true"])
    check = subprocess.run(["ssh", *runner.options(), "-O", "check", "loginnode"],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert check.returncode == 0, check.stderr
    assert "Master running" in check.stderr
    # sshd logs one "Accepted publickey" per authenticated TCP connection: five more commands
    # over the master must add none (counted, not timed, so a loaded machine cannot fail it).
    logins = (d / "sshd.log").read_text().count("Accepted publickey")
    assert logins >= 1
    for _ in range(5):
        runner.run(["true"])
    assert (d / "sshd.log").read_text().count("Accepted publickey") == logins


def test_unknown_host_key_is_refused(sshd, tmp_path):
    config, _ = sshd
    r = SSHRunner("strangerhost", Path("/tmp") / f"lt-ssh-s-{os.getpid()}", config_file=config)
    with pytest.raises(CommandError) as info:
        r.run(["true"], timeout=20)
    assert info.value.returncode == 255
    assert "Host key verification failed" in info.value.stderr


def test_options_are_batchmode_strict_multiplexed(tmp_path):
    argv = SSHRunner("login1", tmp_path).command(["qstat", "-f", "1[].s"])
    text = " ".join(argv)
    for opt in ("BatchMode=yes", "StrictHostKeyChecking=yes", "ControlMaster=auto",
                f"ControlPath={tmp_path}/%C", "ControlPersist="):
        assert opt in text
    assert argv[-3:] == ["login1", "--", "qstat -f '1[].s'"]


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm-cpus")  # submits to the 4-CPU node: see tests/slurm/test_launcher_slurm.py
def test_launcher_over_ssh_on_real_slurm(sshd, tmp_path, slurm):
    """submit/status/cancel with every scheduler command run over SSH on the 'login node'."""
    config, _ = sshd
    caps = tmp_path / "caps.yaml"
    caps.write_text('max_array_size: 4\nmax_running: 2\nmax_queued: 4\nmax_walltime: "00:05:00"\n')
    caps.chmod(0o644)
    script = tmp_path / "sleep.sh"
    script.write_text("#!/bin/bash\n#SBATCH --output=/dev/null\nsleep 60\n")
    env = dict(os.environ, LAUNCHER_CAPS=str(caps), LAUNCHER_STATE_DIR=str(tmp_path / "state"),
               LAUNCHER_SSH="loginnode", LAUNCHER_SSH_CONFIG=str(config),
               RABBITMQ_URI="amqp://guest:hunter2@127.0.0.1:1/%2f")
    # the scheduler is detected over SSH (no --scheduler)
    run = lambda *a: subprocess.run([sys.executable, "-m", "launcher", *a], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=60)
    proc = run("submit", "--tasks", "2", "--script", str(script))
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    try:
        status = json.loads(run("status", "--json").stdout)
        assert status["where"] == "ssh loginnode" and status["scheduler"] == "slurm"
        assert status["tasks"]["queued"] + status["tasks"]["running"] == 2
        assert run("cancel", job).returncode == 0
        status = json.loads(run("status", "--json").stdout)
        assert status["tasks"]["queued"] + status["tasks"]["running"] == 0
        assert "hunter2" not in json.dumps(status)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
