"""Tests for devtools.bench_clowder, the lean benchmark stand-in: real HTTP, pyclowder's own helpers.

pyclowder picks its API version on first import, so each version's checks run in a subprocess
with CLOWDER_VERSION set; the server runs as its own process, as the benchmarks run it.
"""
import base64
import os
import subprocess
import sys
import textwrap

import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTENT = b"lorem ipsum dolor sit amet\n" * 37


@pytest.fixture
def bench():
    proc = subprocess.Popen([sys.executable, "-m", "devtools.bench_clowder", "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("standin: "), line
        yield line.split(" ", 1)[1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _add(url: str, n: int = 1) -> list:
    data = base64.b64encode(CONTENT).decode()
    if n == 1:
        return [requests.post(url + "_standin/files", json={"name": "f.txt", "content_b64": data}).json()["id"]]
    return requests.post(url + "_standin/files", json={"name": "f.txt", "content_b64": data, "count": n}).json()["ids"]


_PYCLOWDER = textwrap.dedent("""
    import os, sys, tempfile
    os.chdir(tempfile.mkdtemp())  # Connector reads notifications.json from the cwd
    import pyclowder.files as files
    from pyclowder.connectors import Connector
    url, fid, version = sys.argv[1], sys.argv[2], sys.argv[3]
    conn = Connector("x", {"name": "x", "version": "1"})
    info = files.download_info(conn, url, "secret", fid)
    assert info["id"] == fid if version == "1" else info == [], info  # v2 reads the file's metadata list
    path = files.download(conn, url, "secret", fid, ext=".txt")
    data = open(path, "rb").read()
    os.remove(path)
    files.upload_metadata(conn, url, "secret", fid, {"content": {"lines": data.count(b"\\n")}})
    print(version, info["filename"] if version == "1" else "f.txt", len(data))
""")


@pytest.mark.parametrize("version", ["1", "2"])
def test_pyclowder_info_download_and_metadata(bench, version):
    fid = _add(bench)[0]
    out = subprocess.run([sys.executable, "-c", _PYCLOWDER, bench, fid, version], capture_output=True, text=True,
                         env=dict(os.environ, CLOWDER_VERSION=version), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [version, "f.txt", str(len(CONTENT))]
    records = requests.get(bench + "_standin/records", params={"kind": "metadata"}).json()
    assert [(r["file_id"], r["api"], r["body"]) for r in records] == [(fid, "v" + version, {"content": {"lines": 37}})]
    assert records[0]["time"] > 0


def test_keys_unknown_files_and_routes(bench):
    fid = _add(bench)[0]
    assert requests.get(f"{bench}api/files/{fid}").status_code == 401
    assert requests.get(f"{bench}api/files/{fid}?key=wrong").status_code == 401
    assert requests.get(f"{bench}api/files/{fid}", headers={"X-API-Key": "secret"}).content == CONTENT
    assert requests.get(f"{bench}api/v2/files/{fid}?key=secret").status_code == 401  # v2: header only
    assert requests.get(f"{bench}api/files/nope?key=secret").status_code == 404
    assert requests.get(f"{bench}api/datasets/x?key=secret").status_code == 404
    assert requests.post(f"{bench}api/files/{fid}/metadata.jsonld?key=secret", data=b"{not json",
                         headers={"Content-Type": "application/json"}).status_code == 400
    counts = requests.get(bench + "_standin/counts").json()["requests"]
    assert counts["GET api/files/{id}"] == 4 and counts["GET api/v2/files/{id}"] == 1
    requests.post(bench + "_standin/clear")
    assert requests.get(bench + "_standin/counts").json()["requests"] == {}


def test_bulk_add_and_pipelined_keep_alive(bench):
    ids = _add(bench, 5)
    assert len(set(ids)) == 5
    import socket
    from urllib.parse import urlsplit
    parts = urlsplit(bench)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        reqs = b"".join(b"GET /api/files/%s?key=secret HTTP/1.1\r\nHost: x\r\n\r\n" % i.encode() for i in ids)
        sock.sendall(reqs)  # five requests in one segment: five answers, in order, on one connection
        data = b""
        while data.count(CONTENT) < 5:
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 5


def test_load_client_measures_a_rate(bench):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        from standin_load import files_per_second
    finally:
        sys.path.pop(0)
    fid = _add(bench)[0]
    assert files_per_second(bench, fid, seconds=0.5, connections=2) > 0
    assert files_per_second(bench, fid, seconds=0.5, connections=2, info=True) > 0
