"""A stop signal during the agent's start-up is acted on (exit 0, nothing taken), never fatal."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            caught = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def test_sigterm_during_start_up_is_held_then_acted_on(tmp_path):
    # `run` with a plugin folder that takes a while to import: SIGTERM arrives before the Runner's handlers.
    plugin = tmp_path / "plugins" / "slowstart"
    plugin.mkdir(parents=True)
    (plugin / "extractor_info.json").write_text('{"name": "test.slowstart", "version": "1.0", "process": {"file": ["*"]}}')
    (plugin / "slowstart.py").write_text(
        "import time\nfrom pyclowder.extractors import Extractor\n\n"
        "class Slow(Extractor):\n    def __init__(self):\n        super().__init__()\n\n"
        "    def process_message(self, connector, host, secret_key, resource, parameters):\n        pass\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), AGENT_PLUGIN_PATH=str(tmp_path / "plugins"),
               AGENT_JOURNAL_DIR=str(tmp_path / "journal"), AGENT_CONNECT_TIMEOUT="30",
               RABBITMQ_URI="amqp://guest:guest@127.0.0.1:1/%2f")  # nothing listens: start-up would wait
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--plugin", "test.slowstart"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # As soon as the process catches SIGTERM (the hold of agent/__main__.py, during the heavy imports,
    # or the Runner's own handler later), the signal must be acted on, never fatal.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _catches_sigterm(proc.pid):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != -signal.SIGTERM, out  # not killed by the signal
    assert "Traceback" not in out, out


def test_held_signal_is_recorded_not_fatal_and_taken_once():
    code = ("import os, signal\nfrom agent import early_signals\nearly_signals.hold()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\nos.kill(os.getpid(), signal.SIGUSR1)\n"
            "print([s.name for s in map(signal.Signals, early_signals.take())], early_signals.take())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['SIGTERM', 'SIGUSR1'] []"


def test_other_commands_get_the_default_handlers_back():
    code = ("import signal\nfrom agent import early_signals\nearly_signals.hold()\n"
            "from agent.cli import main\nmain(['plugins'])\n"
            "print(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "
            "signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().endswith("True True"), proc.stdout + proc.stderr
