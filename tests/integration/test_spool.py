"""The spool transport end to end: agents that reach nothing but the shared filesystem.

The agent runs in a network namespace with only its own loopback (no link at all): messages
and files come through the spool folder that `python -m launcher spool` fills from RabbitMQ
and the Clowder stand-in, and the extractor's uploads go back the same way.
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from typing import Any

import pytest
import requests

from helpers import services
from helpers.agent_harness import (REPO, TEST_PLUGINS, AgentHarness, assert_each_to_its_plugin,  # noqa: F401
                                   harness, second_harness)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def no_network():
    """A network namespace with nothing but its own loopback."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        services.unavailable("network namespaces need root and iproute2 (scripts/install.sh installs iproute2)")
    name = f"cspool-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        services.unavailable(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Spool:
    """The launcher's spool loop as a subprocess, plus agents in the namespace."""

    def __init__(self, h: AgentHarness, ns: str, tmp: Any) -> None:
        self.h, self.ns, self.dir = h, ns, str(tmp / "spool")
        self.log_path = str(tmp / "spool.log")
        self.proc = None

    def start_launcher(self, *extra: str, ssh: Any = None) -> subprocess.Popen:
        env = dict(os.environ, RABBITMQ_URI=self.h.url, RABBITMQ_QUEUE=self.h.queue, PYTHONPATH=REPO)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "launcher", "spool", "--dir", self.dir, "--interval",
                                          "0.2", *extra, *(ssh or ())], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self.proc

    def inbox(self) -> list[str]:
        try:
            return os.listdir(os.path.join(self.dir, "inbox"))
        except FileNotFoundError:
            return []

    def log(self) -> str:
        with open(self.log_path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")

    def start_agent(self, *args: str, **env: Any) -> subprocess.Popen:
        h = self.h
        log_path = str(h.tmp / f"agent-{len(h.procs)}.log")
        h.logs.append(log_path)
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-m", "agent", "run", *args],
                                    env=h.env(AGENT_SOURCE="spool", AGENT_SPOOL_DIR=self.dir, **env), cwd=REPO,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        h.procs.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float = 60) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not exit within {timeout}s\n{self.h.log_text()}\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def spool(harness, no_network, tmp_path):
    s = Spool(harness, no_network, tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_files_and_results_travel_through_the_spool(harness, spool):
    ids = [harness.publish_file(b"ok\n", name=f"s{i}.txt") for i in range(3)] + [harness.publish_file(b"tags\n")]
    abort = harness.add_file(b"abort\n")
    abort_body = harness.v1_body(abort)
    harness.publish(abort_body)
    launcher = spool.start_launcher("--until-empty")
    harness.wait_for(lambda: len(spool.inbox()) >= 5, 30, "messages staged")
    agent = spool.start_agent("--idle-exit", "2")
    assert spool.wait(agent) == 0, harness.log_text()
    assert spool.wait(launcher) == 0, spool.log()
    for fid in ids:
        md = harness.standin.metadata_for(fid)
        assert len(md) == 1, (fid, md, spool.log())
        assert md[0]["agent"]["extractor_id"].startswith(harness.standin.url)  # real host put back
    assert harness.standin.records(kind="tags", file_id=ids[-1])
    errors = harness.errors()
    assert [json.loads(b) for _, b in errors] == [abort_body]  # unchanged body, with the reason
    assert errors[0][0].headers["x-error-reason"]
    done = [s for s in harness.statuses() if s["status"].startswith("StatusMessage.done")]
    assert sorted(s["file_id"] for s in done) == sorted(ids)
    assert harness.depth() == 0
    assert spool.inbox() == [] and os.listdir(os.path.join(spool.dir, "outbox")) == []


def test_one_agent_serves_two_plugins_each_from_its_own_spool_folder(harness, second_harness, spool, no_network,
                                                                     tmp_path):
    """Plugin a claims from the agent-wide spool_dir, plugin b from its own (the plugins table); two spoolers."""
    a_name, b_name = "test.directive", "test.simple.wc"
    (tmp_path / "b").mkdir()
    b_spool = Spool(second_harness, no_network, tmp_path / "b")
    try:
        a_ids = [harness.publish_file(b"ok\n", name=f"a{i}.txt") for i in range(2)]
        b_ids = [second_harness.publish_file(b"one two three\n", name=f"b{i}.txt") for i in range(2)]
        launchers = [spool.start_launcher("--until-empty"), b_spool.start_launcher("--until-empty")]
        harness.wait_for(lambda: len(spool.inbox()) >= 2 and len(b_spool.inbox()) >= 2, 30, "messages staged")
        agent = spool.start_agent("--plugin", f"{a_name},{b_name}", "--idle-exit", "2", RABBITMQ_QUEUE="",
                                  AGENT_PLUGIN_PATH=TEST_PLUGINS,
                                  AGENT_PLUGINS=json.dumps({b_name: {"spool_dir": b_spool.dir}}))
        assert spool.wait(agent) == 0, harness.log_text()
        assert spool.wait(launchers[0]) == 0, spool.log()
        assert b_spool.wait(launchers[1]) == 0, b_spool.log()
        # each folder's files went to its own plugin's extractor only
        assert_each_to_its_plugin(harness.standin, a_ids, b_ids, "ok")
        assert harness.depth() == 0 and second_harness.depth() == 0
        assert harness.errors() == [] and second_harness.errors() == []
    finally:
        b_spool.stop()


@pytest.mark.chaos
def test_a_crashed_agents_claim_is_reclaimed(harness, spool):
    slow = harness.publish_file(b"sleep 3\n")
    launcher = spool.start_launcher()
    first = spool.start_agent()
    harness.wait_for(lambda: any(r[0] == slow for r in harness.runs()), 30, "the slow file to start")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    # The launcher sees the claim's lock free and puts the message back, with one more attempt.
    harness.wait_for(spool.inbox, 15, "the claim to be reclaimed")
    staged = json.load(open(os.path.join(spool.dir, "inbox", spool.inbox()[0])))
    assert staged["headers"]["x-agent-attempts"] == 1
    second = spool.start_agent("--idle-exit", "2")
    assert spool.wait(second) == 0, harness.log_text()
    outbox = os.path.join(spool.dir, "outbox")
    # Collected: uploaded, and nothing left in the outbox that could upload more.
    harness.wait_for(lambda: harness.standin.metadata_for(slow) and os.listdir(outbox) == [], 15,
                     "the launcher to collect the results")
    assert len(harness.standin.metadata_for(slow)) == 1  # the dead attempt's partial results were dropped
    assert len([r for r in harness.runs() if r[0] == slow]) == 2
    assert "put back" in spool.log() or "reclaimed 1" in spool.log()
    launcher.terminate()
    launcher.wait(timeout=30)


def test_recorded_ids_are_mapped_to_the_real_ones(harness, tmp_path):
    """A preview uploaded through the recorder is linked under the id Clowder returns at replay."""
    from agent.sources.spool import SpoolSource
    from launcher.relay.spool import Spooler

    fid = harness.publish_file(b"ok\n")
    spooler = Spooler(harness.url, harness.queue, str(tmp_path / "spool"))
    try:
        spooler.step()  # stages the message
        got = []
        source = SpoolSource(str(tmp_path / "spool"), 1, "in-process")
        source.open(lambda: None, lambda: None)
        got = source.take()
        assert len(got) == 1
        body = json.loads(got[0].body)
        host, key = body["host"], body["secretKey"]
        assert host.startswith("http://127.0.0.1:") and key != harness.key
        info = requests.get(f"{host}api/files/{fid}/metadata", params={"key": key}, timeout=10).json()
        assert open(info["filepath"], "rb").read() == b"ok\n"  # pyclowder reads the staged file in place
        assert requests.get(f"{host}api/datasets/other/files", params={"key": key}, timeout=10).status_code == 403
        preview = requests.post(f"{host}api/previews", params={"key": key}, files={"File": ("p.png", b"PNG")},
                                timeout=10).json()["id"]
        assert preview.startswith("spool-")
        link = requests.post(f"{host}api/files/{fid}/previews/{preview}", params={"key": key}, json={}, timeout=10)
        assert link.status_code == 200
        source.complete(got[0])
        source.close()
        spooler.step()  # collects: replays both calls
        previews = harness.standin.records(kind="preview", file_id=fid)
        assert len(previews) == 1 and not previews[0]["preview_id"].startswith("spool-")
    finally:
        spooler.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A private sshd on 127.0.0.1 standing in for the login node; yields an ssh -F config file."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not (os.path.exists(sshd_bin) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        services.unavailable("OpenSSH server and client are needed (scripts/install.sh installs them)")
    d = tmp_path_factory.mktemp("spool-sshd")
    d.chmod(0o700)
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\n"
        f"StrictModes no\nPidFile {d}/sshd.pid\nPermitRootLogin prohibit-password\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "w"))
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    config = d / "ssh_config"
    config.write_text(f"Host loginnode\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n"
                      f"  IdentityFile {d}/user_key\n  IdentitiesOnly yes\n  UserKnownHostsFile {d}/known_hosts\n"
                      "  GlobalKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    services.wait_for_port("127.0.0.1", port)  # the tests fail with ssh's own error if it never came up
    try:
        yield str(config)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_launcher_stages_over_ssh_to_the_login_node(harness, spool, sshd):
    """The launcher on a VM without the shared filesystem: the spool lives on the 'login node'."""
    ids = [harness.publish_file(b"ok\n") for _ in range(3)]
    launcher = spool.start_launcher("--until-empty", ssh=("--ssh", "loginnode", "--ssh-config", sshd,
                                                          "--remote-python", sys.executable))
    harness.wait_for(lambda: len(spool.inbox()) >= 3, 30, "messages staged over ssh")
    agent = spool.start_agent("--idle-exit", "2")
    assert spool.wait(agent) == 0, harness.log_text()
    assert spool.wait(launcher) == 0, spool.log()
    for fid in ids:
        assert len(harness.standin.metadata_for(fid)) == 1, spool.log()
    assert harness.depth() == 0 and harness.errors() == []
