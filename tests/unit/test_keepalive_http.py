"""agent.keepalive_http through ClowderHTTP, against a real HTTP/1.1 server on loopback.

The kept-alive path must answer like requests would (status, headers, body, streaming, redirects,
exception types) and keep its connections: the server counts the TCP connections it accepted.
"""
from __future__ import annotations

import gzip
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from agent.clowder_http import ClowderHTTP, is_transient


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1  # type: ignore[attr-defined]

    def _answer(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.seen.append(("GET", self.path, dict(self.headers), b""))  # type: ignore[attr-defined]
        if self.path.startswith("/big"):
            self._answer(200, b"x" * 100_000, Content_Type="application/octet-stream")
        elif self.path.startswith("/moved"):
            self._answer(302, b"", Location="/api/files/f1?key=k")
        elif self.path.startswith("/gzip"):
            self._answer(200, gzip.compress(b'{"zipped": true}'), Content_Encoding="gzip")
        elif self.path.startswith("/twice"):
            self.send_response(200)
            self.send_header("Link", "<a>")
            self.send_header("Link", "<b>")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
        elif self.path.startswith("/missing"):
            self._answer(404, b'{"message": "not found"}')
        elif self.path.startswith("/short"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"only part of it")
            self.wfile.flush()
            self.close_connection = True
        elif self.path.startswith("/close"):
            self._answer(200, b'{"closing": true}', Connection="close")
            self.close_connection = True
        else:
            self._answer(200, json.dumps({"path": self.path, "filename": "f.txt"}).encode())

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.seen.append(("POST", self.path, dict(self.headers), body))  # type: ignore[attr-defined]
        self._answer(200, b'{"ok": true}')


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.connections = 0  # type: ignore[attr-defined]
    srv.seen = []  # type: ignore[attr-defined]
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv: ThreadingHTTPServer, path: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


@pytest.fixture()
def http(monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = ClowderHTTP(attempts=1)
    yield client
    client.close()


def test_calls_share_one_connection_and_answer_like_requests(server, http):
    for _ in range(5):
        resp = http.request("GET", _url(server, "/api/files/f1/metadata?key=k"), stream=True, verify=True)
        assert resp.status_code == 200 and resp.json()["filename"] == "f.txt"
        assert resp.headers["content-type"] == "application/json" and resp.url.endswith("key=k")
    resp = http.request("POST", _url(server, "/api/files/f1/metadata.jsonld?key=k"),
                        data=json.dumps({"content": {"w": "é"}}), headers={"Content-Type": "application/json"})
    assert resp.json() == {"ok": True}
    assert server.connections == 1
    method, path, headers, body = server.seen[-1]
    assert json.loads(body.decode("utf-8")) == {"content": {"w": "é"}}
    assert headers["Content-Type"] == "application/json" and headers["User-Agent"].startswith("python-requests")


def test_params_json_and_streamed_download(server, http):
    resp = http.request("GET", _url(server, "/api/search"), params={"q": "a b", "n": 2})
    assert resp.json()["path"] == "/api/search?q=a+b&n=2"
    http.request("POST", _url(server, "/api/x"), json={"a": 1})
    assert json.loads(server.seen[-1][3]) == {"a": 1} and server.seen[-1][2]["Content-Type"] == "application/json"
    resp = http.request("GET", _url(server, "/big"), stream=True)
    chunks = list(resp.iter_content(chunk_size=10 * 1024))
    assert b"".join(chunks) == b"x" * 100_000 and len(chunks) >= 10
    http.request("GET", _url(server, "/after"))
    assert server.connections == 1  # the fully read stream gave its connection back


def test_a_half_read_stream_does_not_poison_the_next_call(server, http):
    resp = http.request("GET", _url(server, "/big"), stream=True)
    next(resp.iter_content(chunk_size=1024))
    resp.close()
    assert http.request("GET", _url(server, "/next")).json()["path"] == "/next"
    assert server.connections == 2


def test_a_connection_the_server_closed_is_replaced(server, http):
    assert http.request("GET", _url(server, "/close")).json() == {"closing": True}
    assert http.request("GET", _url(server, "/again")).json()["path"] == "/again"
    assert server.connections == 2


def test_redirect_gzip_and_errors(server, http):
    resp = http.request("GET", _url(server, "/moved"))
    assert resp.status_code == 200 and resp.json()["path"] == "/api/files/f1?key=k"
    assert http.request("GET", _url(server, "/gzip")).json() == {"zipped": True}
    assert http.request("GET", _url(server, "/twice")).headers["link"] == "<a>, <b>"  # as requests joins them
    with pytest.raises(requests.HTTPError) as err:
        http.request("GET", _url(server, "/missing"))
    assert err.value.response.status_code == 404
    resp = http.request("GET", _url(server, "/missing"), raise_status=False)
    assert resp.status_code == 404 and resp.json() == {"message": "not found"}


def test_a_cut_download_is_a_transient_error(server, http):
    resp = http.request("GET", _url(server, "/short"), stream=True)
    with pytest.raises(requests.exceptions.ChunkedEncodingError) as err:
        b"".join(resp.iter_content(chunk_size=4096))
    assert is_transient(err.value)


def test_refused_and_silent_servers_raise_requests_errors(http):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(requests.ConnectionError):
        http.request("GET", f"http://127.0.0.1:{port}/x")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        with pytest.raises(requests.Timeout):
            http.request("GET", f"http://127.0.0.1:{silent.getsockname()[1]}/x", timeout=(2, 0.3))
    finally:
        silent.close()


def test_a_proxy_in_the_environment_sends_the_call_through_requests(server, monkeypatch):
    # The test server plays the proxy: requests sends it the absolute URL, the kept-alive path never would.
    monkeypatch.setenv("HTTP_PROXY", _url(server, ""))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = ClowderHTTP(attempts=1)
    try:
        client.request("GET", "http://clowder.invalid/api/files/f1?key=k", raise_status=False)
    finally:
        client.close()
    assert server.seen[-1][1] == "http://clowder.invalid/api/files/f1?key=k"


def test_uploads_requests_builds_still_go_through_requests(server, http):
    http.request("POST", _url(server, "/api/uploadToDataset/d1?key=k"), files={"File": ("a.txt", b"hello")})
    method, path, headers, body = server.seen[-1]
    assert headers["Content-Type"].startswith("multipart/form-data") and b"hello" in body


def test_malformed_urls_and_headers_are_final_errors_that_never_show_the_key(server, http):
    with pytest.raises(requests.exceptions.InvalidURL) as err:
        http.request("GET", _url(server, "/api/files/f1?key=topsecret\nX: y"))
    assert "topsecret" not in str(err.value) and not is_transient(err.value)
    with pytest.raises(requests.exceptions.InvalidHeader) as err:
        http.request("GET", _url(server, "/api/files/f1"), headers={"X-API-KEY": "topsecret\r\nX: y"})
    assert "topsecret" not in str(err.value) and not is_transient(err.value)
    assert http.request("GET", _url(server, "/after")).json()["path"] == "/after"  # the client goes on
