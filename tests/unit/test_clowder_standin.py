"""Tests for devtools.clowder_standin, driven through pyclowder 3.0.8's own public helpers.

pyclowder picks its API version when ``pyclowder.files``/``pyclowder.datasets`` are first
imported, so the v1 checks run in this process (imported with CLOWDER_VERSION=1) and the v2
checks run in a subprocess with CLOWDER_VERSION=2. No timing is asserted except lower bounds.
"""
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest
import requests

from devtools.clowder_standin import ClowderStandin

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if "pyclowder.files" not in sys.modules:
    _saved = os.environ.get("CLOWDER_VERSION")
    os.environ["CLOWDER_VERSION"] = "1"
    try:
        import pyclowder.datasets  # noqa: F401
        import pyclowder.files  # noqa: F401
    finally:
        if _saved is None:
            os.environ.pop("CLOWDER_VERSION", None)
        else:
            os.environ["CLOWDER_VERSION"] = _saved
import pyclowder.datasets as pc_datasets  # noqa: E402
import pyclowder.files as pc_files  # noqa: E402
from pyclowder.connectors import Connector  # noqa: E402

v1_only = pytest.mark.skipif(pc_files.clowder_version != 1,
                             reason="pyclowder was already imported for Clowder v2 in this session")

KEY = "secret"


@pytest.fixture(autouse=True)
def _time_bound():
    """Fail (rather than hang) any test that runs longer than 120 s."""
    def on_alarm(*_):
        raise TimeoutError("test exceeded 120 s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 120)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def cs():
    with ClowderStandin(keys={KEY}) as standin:
        yield standin


@pytest.fixture
def conn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Connector reads notifications.json from the cwd
    return Connector("x", {"name": "x", "version": "1"})


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


# -- v1 through pyclowder ------------------------------------------------------------------------

@v1_only
def test_v1_download_small_and_3mb(cs, conn):
    small = cs.add_file(name="hello.txt", content=b"hello world\n")
    big_bytes = os.urandom(3 * 1024 * 1024 + 17)
    big = cs.add_file(name="big.bin", content=big_bytes)
    for fid, expected in ((small, b"hello world\n"), (big, big_bytes)):
        path = pc_files.download(conn, cs.url, KEY, fid, ext=".dat")
        try:
            assert _read(path) == expected
        finally:
            os.remove(path)
    assert cs.request_counts()["GET api/files/{id}"] == 2


@v1_only
def test_v1_download_info_and_local_filepath(cs, conn, tmp_path):
    on_disk = tmp_path / "data.csv"
    on_disk.write_bytes(b"a,b\n1,2\n")
    fid = cs.add_file(name="data.csv", path=str(on_disk))
    info = pc_files.download_info(conn, cs.url, KEY, fid)
    assert info["id"] == fid and info["filename"] == "data.csv"
    assert info["size"] == "8" and info["status"] == "PROCESSED" and info["content-type"] == "text/csv"
    assert info["filepath"] == str(on_disk)
    # pyclowder's local-file shortcut takes the path instead of downloading
    assert conn._check_for_local_file(info) == str(on_disk)
    path = pc_files.download(conn, cs.url, KEY, fid)
    try:
        assert _read(path) == b"a,b\n1,2\n"
    finally:
        os.remove(path)
    assert "filepath" not in pc_files.download_info(conn, cs.url, KEY, cs.add_file(name="m.txt", content=b"x"))


@v1_only
def test_v1_metadata_roundtrip(cs, conn):
    fid = cs.add_file(name="a.txt", content=b"abc")
    md = {"@context": ["https://clowder.ncsa.illinois.edu/contexts/metadata.jsonld"],
          "agent": {"@type": "cat:extractor", "extractor_id": "https://clowder/api/extractors/wc", "name": "wc"},
          "content": {"lines": 1}}
    pc_files.upload_metadata(conn, cs.url, KEY, fid, md)
    assert cs.metadata_for(fid) == [md]
    rec = cs.records("metadata", file_id=fid)[0]
    assert rec["api"] == "v1" and rec["body"] == md and rec["time"] > 0
    listed = pc_files.download_metadata(conn, cs.url, KEY, fid)
    assert len(listed) == 1 and listed[0]["content"] == {"lines": 1} and "attached_to" in listed[0]
    assert pc_files.download_metadata(conn, cs.url, KEY, fid, extractor="wc") == listed
    assert pc_files.download_metadata(conn, cs.url, KEY, fid, extractor="other") == []


@v1_only
def test_v1_preview_tags_thumbnail(cs, conn, tmp_path):
    fid = cs.add_file(name="img.png", content=b"\x89PNG")
    preview = tmp_path / "preview.png"
    preview.write_bytes(b"preview-bytes")
    pid = pc_files.upload_preview(conn, cs.url, KEY, fid, str(preview), previewmetadata={"width": 10})
    recs = cs.records("preview", file_id=fid)
    assert len(recs) == 1 and recs[0]["preview_id"] == pid
    assert recs[0]["body"]["filename"] == "preview.png"
    assert recs[0]["body"]["sha256"] == _sha(b"preview-bytes") and recs[0]["body"]["size"] == 13
    assert cs.records("preview_metadata", file_id=fid)[0]["body"] == {"width": 10}

    pc_files.upload_tags(conn, cs.url, KEY, fid, {"tags": ["a", "b"]})
    assert cs.records("tags", file_id=fid)[0]["body"] == {"tags": ["a", "b"]}

    tid = pc_files.upload_thumbnail(conn, cs.url, KEY, fid, str(preview))
    assert cs.records("thumbnail", file_id=fid)[0]["thumbnail_id"] == tid
    assert pc_files.download_info(conn, cs.url, KEY, fid)["thumbnail"] == tid


@v1_only
def test_v1_upload_to_dataset(cs, conn, tmp_path):
    did = cs.add_dataset(name="ds")
    out = tmp_path / "result.json"
    out.write_bytes(b'{"ok": true}')
    new_id = pc_files.upload_to_dataset(conn, cs.url, KEY, did, str(out))
    assert new_id and cs.file_content(new_id) == b'{"ok": true}'
    rec = cs.records("upload", dataset_id=did)[0]
    assert rec["file_id"] == new_id and rec["body"] == {"filename": "result.json", "size": 12,
                                                       "sha256": _sha(b'{"ok": true}')}
    names = [f["filename"] for f in pc_datasets.get_file_list(conn, cs.url, KEY, did)]
    assert names == ["result.json"]


@v1_only
def test_v1_datasets(cs, conn):
    did = cs.add_dataset(name="my dataset", description="desc")
    fid = cs.add_file(name="a.txt", content=b"a", dataset_id=did)
    info = pc_datasets.get_info(conn, cs.url, KEY, did)
    assert info["id"] == did and info["name"] == "my dataset" and info["description"] == "desc"
    files = pc_datasets.get_file_list(conn, cs.url, KEY, did)
    assert [(f["id"], f["filename"], f["size"]) for f in files] == [(fid, "a.txt", "1")]

    md = {"@context": "ctx", "agent": {"name": "x"}, "content": {"n": 1}}
    pc_datasets.upload_metadata(conn, cs.url, KEY, did, md)
    assert cs.records("dataset_metadata", dataset_id=did)[0]["body"] == md
    assert pc_datasets.download_metadata(conn, cs.url, KEY, did)[0]["content"] == {"n": 1}
    pc_datasets.upload_tags(conn, cs.url, KEY, did, {"tags": ["t"]})
    assert cs.records("dataset_tags", dataset_id=did)[0]["body"] == {"tags": ["t"]}

    new_did = pc_datasets.create_empty(conn, cs.url, KEY, "fresh", "made by test")
    assert pc_datasets.get_info(conn, cs.url, KEY, new_did)["name"] == "fresh"
    assert pc_datasets.get_file_list(conn, cs.url, KEY, new_did) == []


@v1_only
def test_v1_errors(cs, conn):
    fid = cs.add_file(name="a.txt", content=b"a")
    with pytest.raises(requests.HTTPError) as bad_key:
        pc_files.download_info(conn, cs.url, "wrong", fid)
    assert bad_key.value.response.status_code == 401
    assert "wrong" not in bad_key.value.response.text  # keys are never echoed
    with pytest.raises(requests.HTTPError) as unknown:
        pc_files.download_info(conn, cs.url, KEY, "no-such-file")
    assert unknown.value.response.status_code == 404
    with pytest.raises(requests.HTTPError) as unknown_ds:
        pc_datasets.get_info(conn, cs.url, KEY, "no-such-dataset")
    assert unknown_ds.value.response.status_code == 404

    r = requests.get(cs.url + "api/files/%s/metadata" % fid, headers={"x-api-key": KEY}, timeout=30)
    assert r.status_code == 200  # header auth, any case
    r = requests.get(cs.url + "api/nothing/here?key=" + KEY, timeout=30)
    assert r.status_code == 404 and r.json()
    r = requests.post(cs.url + "api/files/%s/metadata.jsonld?key=%s" % (fid, KEY), data=b"{not json",
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400
    assert cs.records() == []


# -- faults ---------------------------------------------------------------------------------------

@v1_only
def test_fail_next_then_success(cs, conn):
    fid = cs.add_file(name="a.txt", content=b"a")
    cs.fail_next(2, status=503, route_contains="/metadata")
    for _ in range(2):
        with pytest.raises(requests.HTTPError) as err:
            pc_files.download_info(conn, cs.url, KEY, fid)
        assert err.value.response.status_code == 503
    assert pc_files.download_info(conn, cs.url, KEY, fid)["id"] == fid
    assert cs.request_counts()["GET api/files/{id}/metadata"] == 3


@v1_only
def test_drop_next_blob_is_detected(cs, conn):
    data = os.urandom(200_000)
    fid = cs.add_file(name="d.bin", content=data)
    cs.drop_next(1, route_contains="api/files/" + fid)
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        pc_files.download(conn, cs.url, KEY, fid)
    # a raw client sees the announced length but fewer bytes
    cs.drop_next(1)
    with requests.get(cs.url + "api/files/%s?key=%s" % (fid, KEY), stream=True, timeout=30) as r:
        assert int(r.headers["Content-Length"]) == len(data)
        got = b""
        with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
            for chunk in r.iter_content(8192):
                got += chunk
        assert len(got) < len(data)
    path = pc_files.download(conn, cs.url, KEY, fid)  # faults are used up
    try:
        assert _read(path) == data
    finally:
        os.remove(path)


@v1_only
def test_drop_next_path_backed_blob(cs, conn, tmp_path):
    on_disk = tmp_path / "big.bin"
    on_disk.write_bytes(os.urandom(1_000_000))
    fid = cs.add_file(name="big.bin", path=str(on_disk))
    cs.drop_next(1)
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        pc_files.download(conn, cs.url, KEY, fid)


@v1_only
def test_drop_next_other_routes(cs, conn):
    fid = cs.add_file(name="a.txt", content=b"a")
    cs.drop_next(1, route_contains="metadata.jsonld")
    with pytest.raises(requests.exceptions.ConnectionError):
        pc_files.upload_metadata(conn, cs.url, KEY, fid, {"content": {"n": 1}})
    assert cs.metadata_for(fid) == []  # dropped before processing
    cs.drop_next(1, route_contains="metadata.jsonld", after_processing=True)
    with pytest.raises(requests.exceptions.ConnectionError):
        pc_files.upload_metadata(conn, cs.url, KEY, fid, {"content": {"n": 2}})
    assert cs.metadata_for(fid) == [{"content": {"n": 2}}]  # processed, answer lost
    pc_files.upload_metadata(conn, cs.url, KEY, fid, {"content": {"n": 3}})
    assert len(cs.metadata_for(fid)) == 2


def test_delay_and_reset(cs):
    fid = cs.add_file(name="a.txt", content=b"a")
    cs.set_delay(0.3, route_contains="/metadata")
    t0 = time.monotonic()
    assert requests.get(cs.url + "api/files/%s/metadata?key=%s" % (fid, KEY), timeout=30).status_code == 200
    assert time.monotonic() - t0 >= 0.3
    cs.fail_next(5)
    cs.reset_faults()
    assert requests.get(cs.url + "api/files/%s?key=%s" % (fid, KEY), timeout=30).content == b"a"


# -- HTTP behaviour -------------------------------------------------------------------------------

def test_keep_alive_reuses_one_connection(cs):
    fid = cs.add_file(name="a.txt", content=b"x" * 1024)
    before = cs.connection_count()
    with requests.Session() as s:
        for _ in range(3):
            r = s.get(cs.url + "api/files/%s?key=%s" % (fid, KEY), timeout=30)
            assert r.status_code == 200 and len(r.content) == 1024
        r = s.post(cs.url + "api/files/%s/metadata.jsonld?key=%s" % (fid, KEY), json={"content": {}}, timeout=30)
        assert r.status_code == 200 and r.json() == "Metadata successfully added to db"
    assert cs.connection_count() - before == 1


def test_chunked_request_body(cs):
    fid = cs.add_file(name="a.txt", content=b"a")

    def body():
        yield b'{"content": '
        yield b'{"chunked": true}}'
    r = requests.post(cs.url + "api/files/%s/metadata.jsonld?key=%s" % (fid, KEY), data=body(),
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200
    assert cs.metadata_for(fid) == [{"content": {"chunked": True}}]


def test_concurrent_clients(cs):
    fid = cs.add_file(name="a.txt", content=b"a" * 100)
    errors = []

    def client(n):
        try:
            with requests.Session() as s:
                for i in range(50):
                    assert s.get(cs.url + "api/files/%s?key=%s" % (fid, KEY), timeout=30).content == b"a" * 100
                    r = s.post(cs.url + "api/files/%s/metadata.jsonld?key=%s" % (fid, KEY),
                               json={"content": {"client": n, "i": i}}, timeout=30)
                    assert r.status_code == 200
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(cs.metadata_for(fid)) == 200
    assert cs.request_counts() == {"GET api/files/{id}": 200, "POST api/files/{id}/metadata.jsonld": 200}
    assert cs.connection_count() == 4


def test_records_filters_and_clear(cs):
    a = cs.add_file(name="a.txt", content=b"a")
    b = cs.add_file(name="b.txt", content=b"b")
    for fid in (a, b):
        requests.post(cs.url + "api/files/%s/tags?key=%s" % (fid, KEY), json={"tags": [fid]}, timeout=30)
    assert [r["file_id"] for r in cs.records("tags")] == [a, b]
    assert cs.records("tags", file_id=b)[0]["body"] == {"tags": [b]}
    assert cs.records("metadata") == []
    cs.clear()
    assert cs.records() == [] and cs.request_counts() == {} and cs.connection_count() == 0
    assert cs.file_content(a) == b"a"  # files survive clear()


def test_v2_file_list_is_paged(cs):
    did = cs.add_dataset(name="many")
    for i in range(12):
        cs.add_file(name="f%02d.txt" % i, content=b"x", dataset_id=did)
    h = {"X-API-KEY": KEY}
    page = requests.get(cs.url + "api/v2/datasets/%s/files" % did, headers=h, timeout=30).json()
    assert page["metadata"]["total_count"] == 12 and len(page["data"]) == 10  # Clowder v2 default limit
    page = requests.get(cs.url + "api/v2/datasets/%s/files?skip=10&limit=10" % did, headers=h, timeout=30).json()
    assert len(page["data"]) == 2
    assert requests.get(cs.url + "api/v2/datasets/%s/files?key=%s" % (did, KEY), timeout=30).status_code == 401


# -- Clowder v2 through pyclowder (subprocess: pyclowder reads CLOWDER_VERSION at import) --------

V2_CLIENT = textwrap.dedent(r"""
    import hashlib, json, os, sys
    import requests
    import pyclowder.files as files, pyclowder.datasets as datasets
    from pyclowder.connectors import Connector
    assert files.clowder_version == 2
    url, key, fid, did, work = sys.argv[1:6]
    c = Connector("x", {"name": "x", "version": "1"})
    out = {}
    p = files.download(c, url, key, fid)
    out["download_sha"] = hashlib.sha256(open(p, "rb").read()).hexdigest(); os.remove(p)
    out["info"] = files.download_info(c, url, key, fid)
    out["summary"] = files.download_summary(c, url, key, fid)
    md = {"context_url": "https://clowder.ncsa.illinois.edu/contexts/metadata.jsonld",
          "content": {"words": 3}, "listener": {"name": "wc", "version": "1"}}
    files.upload_metadata(c, url, key, fid, md)
    out["metadata"] = files.download_metadata(c, url, key, fid)
    prev = os.path.join(work, "preview.png"); open(prev, "wb").write(b"png!")
    out["preview_id"] = files.upload_preview(c, url, key, fid, prev, preview_mimetype="image/png",
                                             visualization_name="v", visualization_description="d")
    out["thumbnail_id"] = files.upload_thumbnail(c, url, key, fid, prev)
    files.upload_tags(c, url, key, fid, {"tags": ["v2"]})
    res = os.path.join(work, "result.txt"); open(res, "wb").write(b"result")
    out["uploaded_id"] = files.upload_to_dataset(c, url, key, did, res)
    out["ds_info"] = datasets.get_info(c, url, key, did)
    out["ds_files"] = datasets.get_file_list(c, url, key, did)
    datasets.upload_metadata(c, url, key, did, {"content": {"ds": 1}})
    out["ds_metadata"] = datasets.download_metadata(c, url, key, did)
    out["new_ds"] = datasets.create_empty(c, url, key, "made-v2", "")
    for name, call in (("bad_key", lambda: files.download_summary(c, url, "wrong", fid)),
                       ("unknown", lambda: files.download_summary(c, url, key, "nope"))):
        try:
            call(); out[name] = None
        except requests.HTTPError as e:
            out[name] = e.response.status_code
    print(json.dumps(out))
""")


def test_v2_helpers_in_subprocess(cs, tmp_path):
    data = b"one two three\n"
    did = cs.add_dataset(name="ds2")
    fid = cs.add_file(name="words.txt", content=data, dataset_id=did)
    env = dict(os.environ, CLOWDER_VERSION="2")
    proc = subprocess.run([sys.executable, "-c", V2_CLIENT, cs.url, KEY, fid, did, str(tmp_path)],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["download_sha"] == _sha(data)
    assert out["info"] == []  # v2 download_info is the metadata list
    assert out["summary"]["id"] == fid and out["summary"]["bytes"] == len(data)
    assert out["summary"]["content_type"]["content_type"] == "text/plain"
    assert out["metadata"][0]["content"] == {"words": 3}
    assert cs.records("metadata", file_id=fid)[0]["api"] == "v2"
    assert cs.metadata_for(fid)[0]["listener"]["name"] == "wc"
    prev = cs.records("preview", file_id=fid)
    assert out["preview_id"] and prev[0]["preview_id"] == out["preview_id"]
    assert prev[0]["body"]["sha256"] == _sha(b"png!") and prev[0]["body"]["content_type"] == "image/png"
    assert out["thumbnail_id"] and cs.records("thumbnail", file_id=fid)[0]["thumbnail_id"] == out["thumbnail_id"]
    assert cs.records("tags", file_id=fid)[0]["body"] == {"tags": ["v2"]}
    assert cs.file_content(out["uploaded_id"]) == b"result"
    assert out["ds_info"]["name"] == "ds2"
    assert sorted(f["name"] for f in out["ds_files"]) == ["result.txt", "words.txt"]
    assert out["ds_metadata"][0]["content"] == {"ds": 1}
    assert cs.records("dataset_create")[0]["body"]["name"] == "made-v2" and out["new_ds"]
    assert out["bad_key"] == 401 and out["unknown"] == 404


# -- the CLI and the control API from other processes ---------------------------------------------

def _spawn_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "devtools.clowder_standin", "--port", "0", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_lines(proc, n, deadline=60.0):
    """The CLI's first n stdout lines, read by a helper thread so a silent CLI cannot hang us."""
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout.readline().rstrip("\n") for _ in range(n)),
                              daemon=True)
    reader.start()
    reader.join(deadline)
    if reader.is_alive() or len(lines) < n or not all(lines):
        raise AssertionError("stand-in CLI did not print %d lines: %r (exit %r)" % (n, lines, proc.poll()))
    return lines


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_cli_port_zero_files_and_sigterm(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"bee")
    (tmp_path / "a.txt").write_bytes(b"ay")
    (tmp_path / "sub").mkdir()
    proc = _spawn_cli("--key", "k1", "--files", str(tmp_path), "--dataset", "demo")
    try:
        first, a_line, b_line, ds_line = _read_lines(proc, 4)
        assert first.startswith("standin: http://127.0.0.1:") and first.endswith("/")
        url = first.split(" ", 1)[1]
        assert int(url.rsplit(":", 1)[1].rstrip("/")) > 0
        name_a, id_a = a_line.rsplit(" ", 1)
        assert name_a == "a.txt" and b_line.startswith("b.txt ") and ds_line.startswith("dataset ")
        assert requests.get(url + "api/files/%s?key=k1" % id_a, timeout=30).content == b"ay"
        info = requests.get(url + "api/files/%s/metadata?key=k1" % id_a, timeout=30).json()
        assert info["filepath"] == str(tmp_path / "a.txt")
        listed = requests.get(url + "api/datasets/%s/files?key=k1" % ds_line.split()[1], timeout=30).json()
        assert sorted(f["filename"] for f in listed) == ["a.txt", "b.txt"]
        assert requests.get(url + "api/files/%s?key=secret" % id_a, timeout=30).status_code == 401
    finally:
        rc = _stop(proc)
    assert rc == 0


def _control(url, method, route, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + "_standin/" + route, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_control_api_from_another_process():
    proc = _spawn_cli()
    try:
        url = _read_lines(proc, 1)[0].split(" ", 1)[1]
        assert _control(url, "GET", "ping")["ok"] is True
        did = _control(url, "POST", "datasets", {"name": "ctl"})["id"]
        fid = _control(url, "POST", "files", {"name": "c.txt", "dataset_id": did,
                                              "content_b64": base64.b64encode(b"control").decode()})["id"]
        assert requests.get(url + "api/files/%s?key=secret" % fid, timeout=30).content == b"control"

        _control(url, "POST", "faults", {"fail": 1, "status": 500, "route": "/tags"})
        tags_url = url + "api/files/%s/tags?key=secret" % fid
        assert requests.post(tags_url, json={"tags": ["x"]}, timeout=30).status_code == 500
        assert requests.post(tags_url, json={"tags": ["x"]}, timeout=30).status_code == 200
        recs = _control(url, "GET", "records?kind=tags&file_id=" + fid)
        assert [r["body"] for r in recs] == [{"tags": ["x"]}]
        counts = _control(url, "GET", "counts")
        assert counts["requests"]["POST api/files/{id}/tags"] == 2 and counts["connections"] >= 1

        _control(url, "POST", "faults", {"drop": 1})
        with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
            requests.get(url + "api/files/%s?key=secret" % fid, timeout=30)
        _control(url, "POST", "faults", {"fail": 3, "reset": True})  # reset first, then add
        _control(url, "POST", "faults", {"reset": True})
        assert requests.get(url + "api/files/%s?key=secret" % fid, timeout=30).status_code == 200

        _control(url, "POST", "clear")
        assert _control(url, "GET", "records") == []
        assert [f["id"] for f in _control(url, "GET", "files")] == [fid]
    finally:
        rc = _stop(proc)
    assert rc == 0
