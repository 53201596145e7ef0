"""Pure parts of the agent: settings, message checks, redaction, frames, plugins, journal."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from agent import ipc
from agent.config import ConfigError, load_config
from agent.journal import Journal, JournalEntry, recover
from agent.messages import BadMessage, Delivery, parse_body
from agent.plugin_loader import PluginError, discover, find_plugin, inspect_folder
from hpc_common.redact import Redactor, redact_uri

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- settings ------------------------------------------------------------------------------------
def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    cfg_file = tmp_path / "agent.yaml"
    cfg_file.write_text("idle_exit: 30\nslots: 3\nmax_retries: 7\n")
    cfg = load_config({"idle_exit": "5"}, {"AGENT_SLOTS": "2"}, str(cfg_file))
    assert (cfg.idle_exit, cfg.slots, cfg.max_retries, cfg.heartbeat) == (5.0, 2, 7, 60.0)


def test_agent_config_env_names_the_file(tmp_path):
    cfg_file = tmp_path / "agent.yaml"
    cfg_file.write_text("plugin: wordcount\n")
    assert load_config({}, {"AGENT_CONFIG": str(cfg_file)}).plugin == "wordcount"


def test_pyclowder_names_are_honoured_and_agent_names_win():
    env = {"RABBITMQ_URI": "amqp://a:b@h/%2f", "RABBITMQ_QUEUE": "q1", "CLOWDER_VERSION": "2", "MAX_RETRY": "4",
           "MOUNTED_PATHS": '{"/remote": "/local"}', "AGENT_PLUGIN_PATH": "/x:/y"}
    cfg = load_config({}, env)
    assert (cfg.rabbitmq_uri, cfg.rabbitmq_queue, cfg.clowder_version, cfg.max_retries) == \
        ("amqp://a:b@h/%2f", "q1", 2, 4)
    assert cfg.mounted_paths == {"/remote": "/local"} and cfg.plugin_path == ["/x", "/y"]
    assert load_config({}, {**env, "AGENT_RABBITMQ_QUEUE": "q2"}).rabbitmq_queue == "q2"


@pytest.mark.parametrize("env, fragment", [
    ({"AGENT_SLOTS": "many"}, "slots from AGENT_SLOTS"),
    ({"AGENT_SLOTS": "0"}, "slots: must be at least 1"),
    ({"CLOWDER_VERSION": "3"}, "must be 1 or 2"),
    ({"MOUNTED_PATHS": "[1]"}, "JSON object"),
    ({"AGENT_SSL_VERIFY": "maybe"}, "not a boolean"),
])
def test_bad_settings_give_clear_errors(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config({}, env)


def test_secret_setting_errors_do_not_show_the_value():
    with pytest.raises(ConfigError) as info:
        load_config({}, {"AGENT_EXTRACTOR_KEY": "", "AGENT_CONNECT_TIMEOUT": "x"})
    assert "connect_timeout" in str(info.value)


def test_unknown_yaml_key_is_refused(tmp_path):
    cfg_file = tmp_path / "agent.yaml"
    cfg_file.write_text("idel_exit: 3\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config({}, {}, str(cfg_file))


def test_cli_has_no_flag_for_secrets():
    out = subprocess.run([sys.executable, "-m", "agent", "run", "--help"], capture_output=True, text=True,
                         cwd=REPO).stdout
    assert "--idle-exit" in out and "--max-messages" in out and "--plugin" in out
    assert "--rabbitmq-uri" not in out and "--extractor-key" not in out


# -- messages ------------------------------------------------------------------------------------
GOOD = {"id": "abc", "host": "http://clowder/", "secretKey": "k"}


@pytest.mark.parametrize("raw, reason", [
    (b"", "empty body"),
    (b"{", "not JSON"),
    (b"[]", "not an object"),
    (b'"text"', "not an object"),
    (json.dumps({"host": "http://x/", "secretKey": "k"}).encode(), "missing field 'id'"),
    (json.dumps({**GOOD, "id": 5}).encode(), "'id' must be a string"),
    (json.dumps({**GOOD, "id": "../../etc/passwd"}).encode(), "not a Clowder identifier"),
    (json.dumps({**GOOD, "id": "  "}).encode(), "is empty"),
    (json.dumps({**GOOD, "host": "file:///etc"}).encode(), "'host'"),
    (json.dumps({**GOOD, "secretKey": None}).encode(), "'secretKey' must be a string"),
    (json.dumps({**GOOD, "filename": ["x"]}).encode(), "'filename' must be a string"),
    (json.dumps({**GOOD, "filename": "a\u0000.txt"}).encode(), "NUL byte"),
    (json.dumps({**GOOD, "retry_count": "1"}).encode(), "'retry_count' must be an integer"),
    (b"[" * 100000, "not JSON"),
])
def test_bad_bodies_are_rejected_with_reasons(raw, reason):
    with pytest.raises(BadMessage, match=reason):
        parse_body(raw, "q")


def test_v2_body_gets_the_delivery_routing_key_and_v1_keeps_its_own():
    assert parse_body(json.dumps(GOOD).encode(), "myqueue")["routing_key"] == "myqueue"
    v1 = {**GOOD, "routing_key": "clowder.file.text.plain"}
    assert parse_body(json.dumps(v1).encode(), "q")["routing_key"] == "clowder.file.text.plain"


def test_latin1_body_is_accepted_like_pyclowder():
    raw = json.dumps({**GOOD, "filename": "caf\u00e9"}, ensure_ascii=False).encode("iso-8859-1")
    assert parse_body(raw, "q")["filename"] == "caf\u00e9"


def test_attempts_header_is_read_defensively():
    assert Delivery(b"", "q", headers={"x-agent-attempts": 2}).attempts == 2
    assert Delivery(b"", "q", headers={"x-agent-attempts": "junk"}).attempts == 0
    assert Delivery(b"", "q").attempts == 0


# -- redaction -----------------------------------------------------------------------------------
def test_redactor_masks_shapes_and_literals():
    r = Redactor()
    r.add("s3cr3t-key-value")
    text = ("GET http://c/api/files/1?key=abcdef&x=1 amqp://user:pa55@host/%2f "
            '{"secretKey": "zzz"} X-API-KEY: hello token s3cr3t-key-value')
    out = r(text)
    for secret in ("abcdef", "pa55", "zzz", "hello", "s3cr3t-key-value"):
        assert secret not in out
    assert "x=1" in out and "amqp://user:***@host" in out
    assert redact_uri("amqp://guest:guest@127.0.0.1:5672/%2f") == "amqp://guest:***@127.0.0.1:5672/%2f"


# -- frames --------------------------------------------------------------------------------------
def test_frames_round_trip_and_detect_truncation():
    buf = io.BytesIO()
    ipc.send(buf, {"t": "job", "body": {"x": "\u00e9" * 3}})
    ipc.send(buf, [1, 2])
    data = buf.getvalue()
    stream = io.BytesIO(data)
    assert ipc.recv(stream) == {"t": "job", "body": {"x": "\u00e9" * 3}}
    assert ipc.recv(stream) == [1, 2]
    assert ipc.recv(stream) is None
    with pytest.raises(ipc.FrameError):
        ipc.recv(io.BytesIO(data[:7]))


def test_frames_taken_from_a_buffer_as_bytes_arrive():
    data = ipc.encode({"t": "status", "n": 1}) + ipc.encode({"t": "done"})
    buf = bytearray(data[:-3])  # the second frame has not fully arrived
    assert list(ipc.take_frames(buf)) == [{"t": "status", "n": 1}]
    assert bytes(buf) == data[len(ipc.encode({"t": "status", "n": 1})):-3]
    buf += data[-3:]
    assert list(ipc.take_frames(buf)) == [{"t": "done"}] and buf == bytearray()
    with pytest.raises(ipc.FrameError, match="over the limit"):
        list(ipc.take_frames(bytearray((ipc.MAX_FRAME + 1).to_bytes(4, "big"))))
    bad = bytearray(ipc.encode([1]) + (3).to_bytes(4, "big") + b"{x}")
    frames = ipc.take_frames(bad)
    assert next(frames) == [1]  # frames before a broken one still come out
    with pytest.raises(ipc.FrameError, match="not JSON"):
        next(frames)


# -- plugins -------------------------------------------------------------------------------------
def _plugin(folder, name, code, info_extra=None):
    folder.mkdir(parents=True)
    (folder / "extractor_info.json").write_text(json.dumps({"name": name, "version": "1", "description": "test", "contexts": [],
                                                           "process": {"file": [""]}, **(info_extra or {})}))
    (folder / "main.py").write_text(textwrap.dedent(code))
    return folder


ARGV_EXTRACTOR = """
    import pyclowder.extractors
    from pyclowder.extractors import Extractor

    class Helper:
        pass

    class Mine(Extractor):
        def __init__(self):
            Extractor.__init__(self)
            self.parser.add_argument('--threshold', type=int, default=7)
            self.setup()
            with open('extractor_info.json') as fh:   # reads its own folder, relative to cwd
                self.raw = fh.read()

    if __name__ == "__main__":
        Mine().start()
"""


def test_discovery_by_name_and_folder(tmp_path):
    _plugin(tmp_path / "plugins" / "mine", "org.example.mine", ARGV_EXTRACTOR)
    found, problems = discover([str(tmp_path / "plugins")])
    assert "org.example.mine" in [p.name for p in found] and problems == []
    spec = find_plugin("mine", [str(tmp_path / "plugins")])
    assert spec.name == "org.example.mine" and spec.class_name == "Mine"
    assert find_plugin("org.example.mine", [str(tmp_path / "plugins")]).folder == spec.folder


def test_unknown_plugin_lists_what_exists(tmp_path):
    _plugin(tmp_path / "p" / "a", "alpha", ARGV_EXTRACTOR)
    with pytest.raises(PluginError, match="not found.*alpha"):
        find_plugin("beta", [str(tmp_path / "p")])


def test_broken_plugin_folders_are_reported(tmp_path):
    bad = tmp_path / "p" / "bad"
    bad.mkdir(parents=True)
    (bad / "extractor_info.json").write_text("{nope")
    found, problems = discover([str(tmp_path / "p")])
    assert not any(p.folder == str(bad) for p in found)
    assert any("not valid JSON" in p for p in problems)
    with pytest.raises(PluginError, match="no .py file defines"):
        _plugin(tmp_path / "q" / "noclass", "x", "print('hi')\n")
        inspect_folder(str(tmp_path / "q" / "noclass"))


def test_extractor_that_parses_argv_and_reads_cwd_instantiates(tmp_path):
    folder = _plugin(tmp_path / "p" / "mine", "org.example.mine", ARGV_EXTRACTOR)
    code = textwrap.dedent(f"""
        import os, sys
        sys.argv = ['pytest', '--unknown-flag-of-the-caller']
        from agent.plugin_loader import find_plugin, instantiate
        ex = instantiate(find_plugin('mine', [{str(tmp_path / 'p')!r}]))
        print(type(ex).__name__, ex.args.threshold, os.getcwd() == {str(folder)!r}, 'org.example.mine' in ex.raw)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.split() == ["Mine", "7", "True", "True"], out.stderr


# -- journal -------------------------------------------------------------------------------------
def _entry(n):
    return JournalEntry(queue="q", body=b'{"id": "%d"}' % n, routing_key="q", reply_to="r",
                        correlation_id=str(n), headers={"x-agent-attempts": 1}, content_type="application/json")


def test_journal_of_a_live_agent_is_left_alone(tmp_path):
    mine = Journal(str(tmp_path), "alive")
    mine.open()
    mine.add(_entry(1))
    other = Journal(str(tmp_path), "other")
    other.open()
    assert recover(str(tmp_path), other.dir, lambda e: None) == 0
    assert len(mine.entries()) == 1


def test_journal_of_a_dead_agent_is_republished_once(tmp_path):
    code = textwrap.dedent(f"""
        from agent.journal import Journal, JournalEntry
        j = Journal({str(tmp_path)!r}, "dead")
        j.open()
        for n in range(3):
            j.add(JournalEntry(queue="q", body=b'{{"n": %d}}' % n, routing_key="q", reply_to="r",
                              correlation_id=str(n)))
        import os; os._exit(0)   # dies holding entries, as kill -9 would leave them
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
    seen = []
    me = Journal(str(tmp_path), "me")
    me.open()
    assert recover(str(tmp_path), me.dir, seen.append) == 3
    assert sorted(e.body for e in seen) == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert seen[0].reply_to == "r"
    assert not os.path.exists(os.path.join(str(tmp_path), "dead"))
    assert recover(str(tmp_path), me.dir, seen.append) == 0


def test_failed_republish_keeps_the_entry(tmp_path):
    dead = Journal(str(tmp_path), "dead")
    dead.open()
    dead.add(_entry(1))
    dead.close()  # lock released, entry kept: like a dead process

    def refuse(_entry):
        raise RuntimeError("broker said no")

    with pytest.raises(RuntimeError):
        recover(str(tmp_path), "", refuse)
    assert len(dead.entries()) == 1
    got = []
    assert recover(str(tmp_path), "", got.append) == 1


# -- property-based: message parsing never fails other than with BadMessage ---------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=20)
_fields = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=300) | _json, "host": st.sampled_from(["http://c/", "https://c/x/", "ftp://x"]) | _json,
    "secretKey": st.text(max_size=50) | _json, "filename": st.text() | _json, "routing_key": st.text() | _json,
    "retry_count": st.integers() | _json, "datasetId": st.text() | _json})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000) | _fields.map(lambda d: json.dumps(d).encode()) |
       _json.map(lambda v: json.dumps(v).encode()))
def test_parse_body_accepts_or_rejects_cleanly(raw):
    try:
        body = parse_body(raw, "q")
    except BadMessage as exc:
        assert str(exc)
        return
    assert isinstance(body, dict)
    for name in ("id", "host", "secretKey", "routing_key"):
        assert isinstance(body[name], str)
    assert body["host"].startswith(("http://", "https://"))
    assert "/" not in body["id"] and "\x00" not in body["id"]
