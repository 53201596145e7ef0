"""Relay test harness: token files, a relay process, a network namespace reaching only it, agents
started inside it (tests/integration/test_relay.py and the chaos scenarios)."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Optional

import requests

from helpers.agent_harness import REPO, AgentHarness


def write_token(path: Any, mode: int = 0o600) -> str:
    token = secrets.token_urlsafe(32)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.write(fd, token.encode() + b"\n")
    os.close(fd)
    os.chmod(str(path), mode)
    return token


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RelayProc:
    """`python -m launcher relay` as a subprocess on a fixed address and state folder."""

    def __init__(self, harness: AgentHarness, host: str, tmp: Any, *extra: str) -> None:
        self.h = harness
        self.host = host
        self.port = free_port(host)
        self.tmp = tmp
        self.token_file = str(tmp / "relay.token")
        self.token = write_token(self.token_file)
        self.state = str(tmp / "relay-state")
        self.extra = list(extra)
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = str(tmp / "relay.log")
        self.scheme = "https" if "--cert" in extra else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "launcher", "relay", "--bind", f"{self.host}:{self.port}",
                "--token-file", self.token_file, "--state-dir", self.state, *self.extra]

    def start(self) -> "RelayProc":
        env = dict(os.environ, RABBITMQ_URI=self.h.url, RABBITMQ_QUEUE=self.h.queue, PYTHONPATH=REPO)
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited {self.proc.returncode}:\n{self.log()}")
            if "relay listening on" in self.log():
                return self
            time.sleep(0.05)
        raise AssertionError(f"relay did not start:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def agent_env(self, **extra: Any) -> dict[str, Any]:
        env = {"AGENT_SOURCE": "relay", "AGENT_RELAY_URL": self.url, "AGENT_RELAY_TOKEN_FILE": self.token_file,
               "AGENT_CONNECT_TIMEOUT": "10", "AGENT_RECONNECT_TIMEOUT": "30"}
        env.update(extra)
        return env

    def call(self, method: str, path: str, body: Any = None, token: Optional[str] = "", **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        data = kw.pop("data", None)
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        return requests.request(method, self.url + path, data=data, headers=headers, timeout=30, **kw)


class Netns:
    """A network namespace whose only link leads to host_ip (the relay's address)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"crelay-{tag}"
        self.host_if, self.ns_if = f"vrh{tag}", f"vrn{tag}"
        used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
        for third in range(0, 256):
            octet = (int(tag, 16) + third) % 250 + 3
            if f"10.231.{octet}." not in used:
                break
        self.host_ip, self.ns_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"

    def _ip(self, *args: str) -> None:
        out = subprocess.run(["ip", *args], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")

    def create(self) -> None:
        self._ip("netns", "add", self.name)
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._ip("link", "set", self.ns_if, "netns", self.name)
        self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        self._ip("netns", "exec", self.name, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        self._ip("netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up")
        self._ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)

    def can_connect(self, host: str, port: int) -> bool:
        code = f"import socket; socket.create_connection(({host!r}, {port}), timeout=2)"
        return subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c", code],
                              capture_output=True).returncode == 0


def start_agent_in(h: AgentHarness, ns: Optional[Netns], *args: str, **env: Any) -> subprocess.Popen:
    """Like AgentHarness.start_agent, inside the namespace when ns is given."""
    log_path = str(h.tmp / f"agent-{len(h.procs)}.log")
    h.logs.append(log_path)
    prefix = ["ip", "netns", "exec", ns.name] if ns is not None else []
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "agent", "run", *args], env=h.env(**env), cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    h.procs.append(proc)
    return proc


def wait_exit(h: AgentHarness, proc: subprocess.Popen, timeout: float = 90) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"agent did not exit within {timeout}s; log:\n{h.log_text()}") from None


def unprocessed(h: AgentHarness, ids: list[str]) -> list[str]:
    return [f for f in ids if not h.standin.metadata_for(f)]
