"""launcher.registration: which extractor each queue registers, and what a failed registration records."""
import json

from launcher.errors import BrokerError
from launcher.registration import Registrar, Registration, find_registrations, read_record
from launcher.status import render_registration


def plugin(root, folder, name, extra=None):
    (root / folder).mkdir(parents=True)
    (root / folder / "extractor_info.json").write_text(json.dumps({"name": name, "version": "1", **(extra or {})}))


def test_queue_named_after_the_extractor_or_its_folder(tmp_path):
    plugin(tmp_path, "wc", "ncsa.wordcount")
    plugin(tmp_path, "csv", "ncsa.csv")
    found, problems = find_registrations(["ncsa.wordcount", "csv"], [], [str(tmp_path)])
    assert not problems
    assert [(r.queue, r.extractor_info["name"]) for r in found] == [("ncsa.wordcount", "ncsa.wordcount"),
                                                                    ("csv", "ncsa.csv")]
    assert found[0].owner == "" and found[0].id and found[0].id != found[1].id


def test_one_queue_one_chosen_plugin_is_a_renamed_queue(tmp_path):
    plugin(tmp_path, "wc", "ncsa.wordcount")
    plugin(tmp_path, "csv", "ncsa.csv")
    found, problems = find_registrations(["site-words"], ["wc"], [str(tmp_path)], owner="me@site")
    assert not problems
    assert found[0].message() == {"id": found[0].id, "queue": "site-words", "owner": "me@site",
                                  "extractor_info": {"name": "ncsa.wordcount", "version": "1"}}


def test_private_queue_and_unique_key(tmp_path):
    plugin(tmp_path, "wc", "ncsa.wordcount")
    found, _ = find_registrations(["private.k1.ncsa.wordcount"], [], [str(tmp_path)], extractor_key="k1")
    assert found[0].extractor_info == {"name": "ncsa.wordcount", "version": "1", "unique_key": "k1"}


def test_unmatched_queue_missing_and_broken_plugins_are_problems(tmp_path):
    plugin(tmp_path, "wc", "ncsa.wordcount")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "extractor_info.json").write_text("{not json")
    found, problems = find_registrations(["a", "ncsa.wordcount"], ["ncsa.wordcount", "broken", "nowhere"],
                                         [str(tmp_path)])
    assert [r.queue for r in found] == ["ncsa.wordcount"]
    assert any("not valid JSON" in p for p in problems)
    assert any("'nowhere' (AGENT_PLUGIN) not found" in p for p in problems)
    assert any(p.startswith("queue 'a': no plugin") for p in problems)


def test_failed_send_is_recorded_and_a_later_one_clears_it(tmp_path):
    calls = []

    def publish(uri, exchange, kind, bodies, connection_name=None):
        calls.append((exchange, kind, [json.loads(b) for b in bodies]))
        if len(calls) == 1:
            raise BrokerError("cannot connect to amqp://u:***@h")

    reg = Registration("q", "/p", {"name": "x"}, "", "id-1")
    registrar = Registrar("amqp://u:secret@h", [reg], 60.0, str(tmp_path), publish=publish, clock=lambda: 1000.0)
    assert registrar.send() is False
    assert read_record(str(tmp_path))["last_error"] == "cannot connect to amqp://u:***@h"
    assert read_record(str(tmp_path))["last_at"] is None
    assert registrar.send() is True
    record = read_record(str(tmp_path))
    assert record["last_at"] == 1000.0 and record["last_error"] is None
    assert record["queues"] == {"q": {"extractor": "x", "version": None, "folder": "/p"}}
    assert calls[1] == ("extractors", "fanout", [{"id": "id-1", "queue": "q", "owner": "", "extractor_info": {"name": "x"}}])
    assert "secret" not in (tmp_path / "registration.json").read_text()


def test_status_line_says_when_and_what_and_why_not():
    record = {"interval_s": 60.0, "last_at": 940.0, "last_error": "cannot connect to amqp://u:***@h",
              "queues": {"words": {"extractor": "ncsa.wordcount", "version": "1", "folder": "/p"}},
              "problems": ["queue 'b': no plugin's extractor_info names it"]}
    assert render_registration(record, 1000.0).splitlines() == [
        "registered 60 s ago (ncsa.wordcount on words; every 60 s)",
        "           last attempt failed: cannot connect to amqp://u:***@h",
        "           queue 'b': no plugin's extractor_info names it"]
    assert render_registration({}, 1000.0) == "registered never (no scale loop has registered the extractors)"


def test_broken_folder_is_said_only_when_a_queue_or_plugin_names_it(tmp_path):
    plugin(tmp_path, "wc", "ncsa.wordcount")
    for name in ("unrelated", "mine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "extractor_info.json").write_text("[]")
    found, problems = find_registrations(["ncsa.wordcount", "private.k.mine"], [], [str(tmp_path)], extractor_key="k")
    assert [r.queue for r in found] == []  # with a key, ncsa.wordcount is not its queue name
    assert [p for p in problems if "needs a" in p] == [f"{tmp_path / 'mine' / 'extractor_info.json'}: needs a \"name\""]
