"""The relay end to end: agents in a network namespace that reaches only the relay.

Each test that needs isolation runs the agent with `ip netns exec`: the namespace has its own
loopback and one veth link whose other end (on the host) carries the relay's address. Nothing
else is reachable from inside: not RabbitMQ, not the Clowder stand-in (both on the host's
127.0.0.1, which inside the namespace is the namespace's own, empty loopback). The messages name
the stand-in as their host, so every Clowder call has to go through the relay's forwarding.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Optional

import pytest
import requests

import services
from agent_harness import REPO, AgentHarness, harness  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


# -- helpers --------------------------------------------------------------------------------------
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


@pytest.fixture(scope="module")
def netns():
    """A namespace reaching only its veth peer; needs root and iproute2 (fails in CI without them)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        services.unavailable("network namespaces need root and iproute2 (scripts/install.sh installs iproute2)")
    ns = Netns()
    try:
        ns.create()
    except RuntimeError as exc:
        ns.delete()
        services.unavailable(f"cannot create a network namespace: {exc}")
    try:
        yield ns
    finally:
        ns.delete()


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


@pytest.fixture
def relay(harness, netns, tmp_path):
    r = RelayProc(harness, netns.host_ip, tmp_path, "--lease-ttl", "4", "--retry-backoff", "0.1").start()
    try:
        yield r
    finally:
        r.stop()


# -- end to end in the namespace --------------------------------------------------------------------
def test_agent_in_netns_reaches_only_the_relay_and_processes_v1_and_v2(harness, netns, relay):
    assert netns.can_connect(relay.host, relay.port)
    assert not netns.can_connect("127.0.0.1", 5672), "RabbitMQ must not be reachable from the namespace"
    assert not netns.can_connect("127.0.0.1", harness.standin.port), "Clowder must not be reachable either"
    v1 = [harness.publish_file(b"ok\n", name=f"a{i}.txt") for i in range(4)] + [harness.publish_file(b"tags\n")]
    proc = start_agent_in(harness, netns, "--idle-exit", "2", **relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert unprocessed(harness, v1) == []
    for fid in v1:
        md = harness.standin.metadata_for(fid)
        assert len(md) == 1
        # pyclowder writes its host into extractor_id: the relay puts the real Clowder back
        assert md[0]["agent"]["extractor_id"].startswith(harness.standin.url)
    assert harness.standin.records(kind="tags", file_id=v1[-1])
    statuses = harness.drain(harness.reply_queue)
    done = [(p, json.loads(b)) for p, b in statuses if json.loads(b)["status"].startswith("StatusMessage.done")]
    assert sorted(s["file_id"] for _, s in done) == sorted(v1)
    assert all(p.correlation_id for p, _ in done)  # v1 statuses carry the request's correlation id

    v2 = [harness.publish_file(b"ok v2\n", v2=True) for _ in range(2)]
    proc = start_agent_in(harness, netns, "--idle-exit", "2", CLOWDER_VERSION="2", **relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    for fid in v2:
        recs = harness.standin.records(kind="metadata", file_id=fid)
        assert len(recs) == 1 and recs[0]["api"] == "v2"
    assert harness.depth() == 0 and harness.errors() == []
    text = harness.log_text() + relay.log()
    assert relay.token not in text


def test_poison_and_abort_are_dead_lettered_with_the_original_body(harness, netns, relay):
    poison = harness.add_file(b"raise\n")
    abort = harness.add_file(b"abort\n")
    bodies = {poison: harness.v1_body(poison), abort: harness.v1_body(abort)}
    for body in bodies.values():
        harness.publish(body)
    harness.publish(None, raw=b"\xff not json")
    good = harness.publish_file(b"ok\n")
    proc = start_agent_in(harness, netns, "--idle-exit", "2", AGENT_MAX_RETRIES="1", **relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert unprocessed(harness, [good]) == []
    all_errors = harness.errors()
    assert [b for _, b in all_errors if b == b"\xff not json"], "a bad body is dead-lettered unchanged"
    errors = {json.loads(body)["id"]: (props, body) for props, body in all_errors if body != b"\xff not json"}
    assert set(errors) == {poison, abort}
    for fid, (props, body) in errors.items():
        assert json.loads(body) == bodies[fid]  # unchanged: the real host and key, not the relay's
        assert props.headers["x-error-reason"]
    assert "gave up after 2 attempt(s)" in errors[poison][0].headers["x-error-reason"]
    assert len([r for r in harness.runs() if r[0] == poison]) == 2


@pytest.mark.chaos
def test_agent_killed_mid_lease_loses_nothing(harness, netns, relay):
    slow = harness.publish_file(b"sleep 2\n")
    others = [harness.publish_file(b"ok\n") for _ in range(3)]
    first = start_agent_in(harness, netns, **relay.agent_env())
    harness.wait_for(lambda: any(r[0] == slow for r in harness.runs()), 30, "the slow file to start")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    # Its leases expire (lease ttl 4 s) and go to the next agent.
    second = start_agent_in(harness, netns, "--idle-exit", "7", **relay.agent_env())
    assert wait_exit(harness, second) == 0, harness.log_text()
    assert unprocessed(harness, [slow, *others]) == []
    assert harness.depth() == 0 and harness.errors() == []
    assert "expired lease(s) returned" in relay.log()
    assert len([r for r in harness.runs() if r[0] == slow]) == 2  # started again by the second agent


@pytest.mark.chaos
def test_relay_killed_mid_run_loses_nothing(harness, netns, relay):
    ids = [harness.publish_file(b"sleep 0.1\n") for _ in range(30)]
    agent = start_agent_in(harness, netns, "--idle-exit", "4", "--slots", "2", **relay.agent_env())
    harness.wait_for(lambda: len(harness.runs()) >= 5, 30, "some files done")
    relay.kill9()
    time.sleep(1.0)
    relay.start()  # same state folder and address: the leases are still there
    assert wait_exit(harness, agent, timeout=120) == 0, harness.log_text() + relay.log()
    assert unprocessed(harness, ids) == []
    assert harness.depth() == 0 and harness.errors() == []
    assert "survived the last run" in relay.log()  # leases in flight at the kill were kept


def test_walltime_drain_hands_back_and_the_next_agent_finishes(harness, netns, relay):
    ids = [harness.publish_file(b"sleep 1.5\n") for _ in range(6)]
    proc = start_agent_in(harness, netns, AGENT_WALLTIME="6", AGENT_WALLTIME_MARGIN="2", **relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert "walltime drain" in harness.log_text()
    done_first = len(ids) - len(unprocessed(harness, ids))
    assert 1 <= done_first < len(ids)
    proc = start_agent_in(harness, netns, "--idle-exit", "2", **relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert unprocessed(harness, ids) == [] and harness.errors() == []


@pytest.mark.mpi
def test_mpi_ranks_in_the_namespace_share_one_relay_source(harness, netns, relay, mpi):
    ids = [harness.publish_file(b"sleep 0.3\n") for _ in range(8)]
    log_path = str(harness.tmp / "mpi.log")
    harness.logs.append(log_path)
    env = harness.env(**relay.agent_env())
    env["PATH"] = os.path.dirname(str(mpi)) + os.pathsep + env.get("PATH", "")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", netns.name, str(mpi), "-n", "2", sys.executable, "-m",
                                 "agent", "run", "--idle-exit", "2"], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    harness.procs.append(proc)
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert unprocessed(harness, ids) == [] and harness.errors() == []
    assert len({pid for _, pid, _ in harness.runs()}) == 2  # both ranks' extractors worked


# -- refusals -----------------------------------------------------------------------------------------
@pytest.fixture
def local_relay(harness, tmp_path):
    r = RelayProc(harness, "127.0.0.1", tmp_path, "--lease-ttl", "30", "--max-upload", "100000").start()
    try:
        yield r
    finally:
        r.stop()


def _lease_one(relay: RelayProc) -> dict[str, Any]:
    resp = relay.call("POST", "/v1/lease", {"agent": "test", "max": 1, "wait": 5})
    assert resp.status_code == 200, resp.text
    leases = resp.json()["leases"]
    assert len(leases) == 1
    return leases[0]


def test_bad_tokens_and_malformed_requests_get_clear_errors(harness, local_relay):
    r = local_relay
    assert r.call("GET", "/v1/hello", token=None).status_code == 401
    wrong = r.call("GET", "/v1/hello", token="x" * 43)
    assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]
    assert r.call("GET", "/v1/hello").json()["queue"] == harness.queue
    bad = r.call("POST", "/v1/lease", data=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
    assert r.call("POST", "/v1/lease", [1, 2]).status_code == 400
    missing = r.call("POST", "/v1/lease", {"max": 1})
    assert missing.status_code == 400 and "'agent'" in missing.json()["error"]
    typed = r.call("POST", "/v1/lease", {"agent": "a", "max": "many"})
    assert typed.status_code == 400 and "'max'" in typed.json()["error"]
    big = r.call("POST", "/v1/status", data=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "limit" in big.json()["error"]
    chunked = r.call("POST", "/v1/complete", data=iter([b'{"lease_id": "x"}']))
    assert chunked.status_code == 411
    assert r.call("GET", "/v1/nowhere").status_code == 404
    assert r.call("GET", "/v1/lease").status_code == 405
    gone = r.call("POST", "/v1/complete", {"lease_id": "no-such-lease"})
    assert gone.status_code == 409 and gone.json()["gone"] is True


def test_forwarding_is_not_an_open_proxy(harness, local_relay):
    r = local_relay
    fid = harness.publish_file(b"ok\n")
    other = harness.add_file(b"someone else's file\n")
    lease = _lease_one(r)
    body = json.loads(base64.b64decode(lease["body_b64"]))
    assert body["host"] == f"{r.url}/clowder/{lease['lease_id']}/" and body["secretKey"] != harness.key
    base, key = body["host"], body["secretKey"]
    ok = requests.get(f"{base}api/files/{fid}?key={key}", timeout=10)
    assert ok.status_code == 200 and ok.content == b"ok\n"
    assert requests.get(f"{base}api/files/{fid}/metadata", headers={"X-API-Key": key}, timeout=10).status_code == 200
    assert requests.get(f"{base}api/files/{fid}?key={harness.key}", timeout=10).status_code == 401  # real key: no
    assert requests.get(f"{base}api/files/{fid}", timeout=10).status_code == 401
    assert requests.get(f"{base}api/files/{other}?key={key}", timeout=10).status_code == 403
    assert requests.get(f"{base}api/collections?key={key}", timeout=10).status_code == 403
    assert requests.delete(f"{base}api/files/{fid}?key={key}", timeout=10).status_code == 405
    for path in ("api/files/../../etc/passwd", "api/files/%2e%2e/x", "http://example.org/", "api//files/x"):
        resp = requests.get(f"{base}{path}?key={key}", timeout=10)
        assert resp.status_code in (400, 403, 404), (path, resp.status_code)
    raw = socket.create_connection(("127.0.0.1", r.port))
    raw.sendall(b"GET http://127.0.0.1:5672/ HTTP/1.1\r\nHost: x\r\n\r\n")  # proxy-style request
    assert raw.recv(4096).startswith(b"HTTP/1.1 401")
    raw.close()
    big = requests.post(f"{base}api/uploadToDataset/{'ds-' + harness.queue}?key={key}",
                        files={"File": ("big.bin", b"x" * 200000)}, timeout=10)
    assert big.status_code == 413 and "limit" in big.json()["error"]
    assert harness.standin.records(kind="upload") == []
    assert r.call("POST", "/v1/complete", {"lease_id": lease["lease_id"]}).status_code == 200
    # A settled lease forwards nothing any more.
    assert requests.get(f"{base}api/files/{fid}?key={key}", timeout=10).status_code == 401
    assert harness.depth() == 0


def test_open_token_files_are_refused_on_both_sides(harness, tmp_path):
    loose = tmp_path / "loose.token"
    write_token(loose, 0o644)
    out = subprocess.run([sys.executable, "-m", "launcher", "relay", "--bind", "127.0.0.1:0", "--token-file",
                          str(loose), "--state-dir", str(tmp_path / "s")], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, RABBITMQ_URI=harness.url, RABBITMQ_QUEUE=harness.queue,
                                  PYTHONPATH=REPO), timeout=30)
    assert out.returncode == 2 and "chmod 600" in out.stderr
    code = harness.run_agent("--idle-exit", "1", AGENT_SOURCE="relay", AGENT_RELAY_URL="http://127.0.0.1:9",
                             AGENT_RELAY_TOKEN_FILE=str(loose))
    assert code == 2 and "chmod 600" in harness.log_text()
    assert open(str(loose)).read().strip() not in harness.log_text() + out.stderr


def test_tls_relay_with_a_self_signed_certificate(harness, tmp_path):
    if not shutil.which("openssl"):
        services.unavailable("openssl is needed to make a test certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    r = RelayProc(harness, "127.0.0.1", tmp_path, "--cert", cert, "--key", key).start()
    try:
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(r.url + "/v1/hello", timeout=10)  # not trusted without the CA
        ids = [harness.publish_file(b"ok\n") for _ in range(2)]
        code = harness.run_agent("--idle-exit", "2", **r.agent_env(AGENT_RELAY_CA=cert))
        assert code == 0, harness.log_text()
        assert unprocessed(harness, ids) == []
    finally:
        r.stop()


def test_large_files_stream_both_ways(harness, tmp_path):
    r = RelayProc(harness, "127.0.0.1", tmp_path, "--max-upload", str(64 << 20)).start()
    try:
        blob = os.urandom(12 << 20)
        fid = harness.publish_file(blob, name="big.bin")
        lease = _lease_one(r)
        body = json.loads(base64.b64decode(lease["body_b64"]))
        base, key = body["host"], body["secretKey"]
        with requests.get(f"{base}api/files/{fid}", params={"key": key}, stream=True, timeout=30) as resp:
            assert resp.status_code == 200 and int(resp.headers["Content-Length"]) == len(blob)
            assert b"".join(resp.iter_content(1 << 20)) == blob
        dataset = "ds-" + harness.queue
        up = requests.post(f"{base}api/uploadToDataset/{dataset}", params={"key": key},
                           files={"File": ("out.bin", blob)}, timeout=60)
        assert up.status_code == 200, up.text
        chunks = (blob[i:i + (1 << 20)] for i in range(0, len(blob), 1 << 20))  # no Content-Length: chunked
        md = requests.post(f"{base}api/files/{fid}/metadata.jsonld", params={"key": key}, data=chunks,
                           headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert md.status_code in (200, 400), md.text  # forwarded (the stand-in judges the body)
        uploads = harness.standin.records(kind="upload")
        assert len(uploads) == 1 and uploads[0]["body"]["size"] == len(blob)
        # The new file id came back through the relay, so this lease may now touch it.
        new_id = up.json()["id"]
        assert requests.get(f"{base}api/files/{new_id}/metadata", params={"key": key}, timeout=10).status_code == 200
        assert r.call("POST", "/v1/release", {"lease_id": lease["lease_id"]}).status_code == 200
    finally:
        r.stop()


# -- the HTTP stack's limits ----------------------------------------------------------------------------
def _raw_hello(r: RelayProc) -> socket.socket:
    """A kept-alive raw connection that has been answered once (so the relay counts it as open)."""
    sock = socket.create_connection(("127.0.0.1", r.port), timeout=10)
    sock.sendall(f"GET /v1/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {r.token}\r\n\r\n".encode())
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    return sock


def test_connections_over_the_cap_get_503_and_the_cap_frees_up(harness, tmp_path):
    r = RelayProc(harness, "127.0.0.1", tmp_path, "--max-connections", "5").start()
    held = []
    try:
        held = [_raw_hello(r) for _ in range(5)]
        over = r.call("GET", "/v1/hello")
        assert over.status_code == 503 and "too many connections" in over.json()["error"]
        held.pop().close()
        time.sleep(0.5)  # the relay sees the close
        assert r.call("GET", "/v1/hello").status_code == 200
    finally:
        for sock in held:
            sock.close()
        r.stop()


def test_size_limits(harness, local_relay):
    r = local_relay
    harness.publish_file(b"ok\n")
    lease = _lease_one(r)
    body = json.loads(base64.b64decode(lease["body_b64"]))
    base, key = body["host"], body["secretKey"]
    dataset = "ds-" + harness.queue
    # A chunked upload (no Content-Length) is cut off at --max-upload too.
    chunks = (b"x" * 50000 for _ in range(4))
    big = requests.post(f"{base}api/uploadToDataset/{dataset}", params={"key": key}, data=chunks,
                        headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert big.status_code == 413 and "limit" in big.json()["error"], big.text
    assert harness.standin.records(kind="upload") == []
    # The work API's JSON limit holds with any Content-Length, and oversized headers are refused.
    exact = r.call("POST", "/v1/status", data=b" " * ((1 << 20) + 1), headers={"Content-Type": "application/json"})
    assert exact.status_code == 413
    assert r.call("POST", "/v1/status", {"items": []}).status_code == 202  # the limit is not the default
    huge = r.call("GET", "/v1/hello", headers={"X-Filler": "y" * 20000})
    assert huge.status_code == 400
    long_line = r.call("GET", "/v1/hello?" + "z" * 70000)
    assert long_line.status_code in (400, 414)
    assert r.call("POST", "/v1/release", {"lease_id": lease["lease_id"]}).status_code == 200


def test_300_agents_long_polling_at_once_each_get_one_lease(harness, local_relay):
    import asyncio

    import aiohttp

    r = local_relay
    n = 300
    auth = {"Authorization": f"Bearer {r.token}"}

    async def one(i: int, session: aiohttp.ClientSession) -> str:
        async with session.post(r.url + "/v1/lease", json={"agent": f"a{i}", "max": 1, "wait": 25}) as resp:
            assert resp.status == 200, await resp.text()
            leases = (await resp.json())["leases"]
        assert len(leases) == 1
        lease_id = leases[0]["lease_id"]
        async with session.post(r.url + "/v1/complete", json={"lease_ids": [lease_id]}) as resp:
            assert (await resp.json())["done"] == [lease_id]
        return lease_id

    async def main() -> list[str]:
        connector = aiohttp.TCPConnector(limit=n)
        async with aiohttp.ClientSession(connector=connector, headers=auth) as session:
            polls = [asyncio.ensure_future(one(i, session)) for i in range(n)]
            await asyncio.sleep(2.0)  # every agent is waiting on its own connection now
            assert not any(p.done() for p in polls)
            await asyncio.get_running_loop().run_in_executor(None, publish_all)
            return await asyncio.wait_for(asyncio.gather(*polls), 90)

    def publish_all() -> None:
        for i in range(n):
            harness.publish({"id": f"f{i}", "host": harness.standin.url, "secretKey": harness.key})

    got = asyncio.run(main())
    assert len(set(got)) == n
    harness.wait_for(lambda: harness.depth() == 0, 10, "the queue to be empty")
    assert r.call("POST", "/v1/lease", {"agent": "late", "max": 1, "wait": 0}).json()["leases"] == []


def test_expect_100_continue_is_answered_only_within_the_limits(harness, local_relay):
    r = local_relay
    body = b'{"items": []}'
    head = (f"POST /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {r.token}\r\n"
            f"Content-Type: application/json\r\nExpect: 100-continue\r\n")
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 202")
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
        sock.sendall(f"{head}Content-Length: {2 << 20}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")  # refused before the body is sent
