"""Several plugins per agent: the plugin list, the slot split and each plugin's own settings
(agent.plugin_set), without a broker."""
import json

import pytest

from agent.config import ConfigError, load_config, parse_setting
from agent.plugin_loader import PluginSpec
from agent.plugin_set import plan_plugins, plugin_names
from agent.sources.registry import source_kind

SPECS = {n: PluginSpec(name=n, folder=f"/plugins/{n.split('.')[-1]}", script="x.py", class_name="X", info={})
         for n in ("ncsa.a", "ncsa.b")}


def _find(name):
    return SPECS[name]


def _plan(environ, config_file=None):
    return plan_plugins(load_config({}, environ, config_file), _find, parse_setting)


def test_plugin_list_from_a_comma_string_and_a_yaml_list(tmp_path):
    assert plugin_names(load_config({}, {"AGENT_PLUGIN": " ncsa.a , ncsa.b,"})) == ["ncsa.a", "ncsa.b"]
    assert plugin_names(load_config({}, {"AGENT_PLUGIN": "ncsa.a ncsa.b"})) == ["ncsa.a", "ncsa.b"]
    assert plugin_names(load_config({}, {})) == [None]
    config = tmp_path / "a.yaml"
    config.write_text("plugin: [ncsa.a, ncsa.b]\n")
    assert load_config({}, {}, str(config)).plugin == "ncsa.a,ncsa.b"


def test_each_plugin_gets_its_own_queue_slots_and_limits():
    plans = _plan({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_SLOTS": "ncsa.a:3,b:2", "AGENT_MAX_RETRIES": "5",
                   "AGENT_PLUGINS": '{"ncsa.a": {"time_limit": "30", "max_retries": 1}}'})
    a, b = plans
    assert (a.queue, a.cfg.slots, a.cfg.time_limit, a.cfg.max_retries, a.cfg.plugin) == ("ncsa.a", 3, 30.0, 1, "ncsa.a")
    assert (b.queue, b.cfg.slots, b.cfg.time_limit, b.cfg.max_retries) == ("ncsa.b", 2, 0.0, 5)  # folder name b


def test_table_slots_win_over_the_split_and_private_queues_follow_the_key():
    plans = _plan({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_SLOTS": "ncsa.a:3", "EXTRACTOR_KEY": "k",
                   "AGENT_PLUGINS": '{"ncsa.a": {"slots": 4}, "ncsa.b": {"rabbitmq_queue": "other"}}'})
    assert [(p.queue, p.cfg.slots) for p in plans] == [("private.k.ncsa.a", 4), ("private.k.other", 1)]


def test_one_plugin_with_a_split_naming_it():
    (plan,) = _plan({"AGENT_PLUGIN": "ncsa.a", "AGENT_SLOTS": "ncsa.a:2"})
    assert plan.cfg.slots == 2 and plan.cfg.effective_prefetch() == 4


@pytest.mark.parametrize("environ, expected", [
    ({"AGENT_PLUGIN": "ncsa.a,ncsa.a"}, "both consume queue ncsa.a"),
    ({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_PLUGINS": '{"ncsa.b": {"rabbitmq_queue": "ncsa.a"}}'},
     "both consume queue ncsa.a"),
    ({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_SLOTS": "ncsa.a:2,ncsa.c:1"}, "slots: ncsa.c is not a plugin"),
    ({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "RABBITMQ_QUEUE": "q"}, "names one queue"),
    ({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_PLUGINS": '{"ncsa.a": {"slots": "many"}}'}, "plugins.ncsa.a.slots"),
    ({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_SOURCE": "relay", "AGENT_RELAY_URL": "http://x:1",
      "AGENT_RELAY_TOKEN_FILE": "/t"}, "plugins ncsa.a and ncsa.b both lease from relay URL http://x:1"),
    ({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_SOURCE": "relay", "AGENT_RELAY_TOKEN_FILE": "/t",
      "AGENT_PLUGINS": '{"ncsa.a": {"relay_url": "http://x:1/"}, "ncsa.b": {"relay_url": "http://x:1"}}'},
     "plugins ncsa.a and ncsa.b both lease from relay URL http://x:1"),
    ({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_SOURCE": "relay", "AGENT_RELAY_TOKEN_FILE": "/t",
      "AGENT_PLUGINS": '{"ncsa.a": {"relay_url": "http://x:1"}}'}, "plugins.ncsa.b: source relay needs relay_url"),
    ({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_SOURCE": "relay", "AGENT_RELAY_TOKEN_FILE": "/t",
      "AGENT_PLUGINS": '{"ncsa.a": {"relay_url": "http://x:1"}, "ncsa.b": {"relay_url": "ftp://x:2"}}'},
     "plugins.ncsa.b: relay_url: 'ftp://x:2' is not an http(s) URL"),
    ({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_SOURCE": "spool",
      "AGENT_PLUGINS": '{"ncsa.a": {"spool_dir": "/s/x"}, "ncsa.b": {"spool_dir": "/s/y/../x/"}}'},
     "plugins ncsa.a and ncsa.b both claim from spool dir /s/x"),
    ({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_SOURCE": "spool",
      "AGENT_PLUGINS": '{"ncsa.b": {"spool_dir": "/s/y"}}'}, "plugins.ncsa.a: source spool needs spool_dir"),
])
def test_bad_combinations_are_one_line(environ, expected):
    with pytest.raises(ConfigError) as err:
        _plan(environ)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_rabbitmq_queue_with_several_plugins_is_fine_when_each_has_its_own():
    plans = _plan({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "RABBITMQ_QUEUE": "q",
                   "AGENT_PLUGINS": '{"ncsa.a": {"rabbitmq_queue": "qa"}, "ncsa.b": {"rabbitmq_queue": "qb"}}'})
    assert [p.queue for p in plans] == ["qa", "qb"]


@pytest.mark.parametrize("bad", ["a:0", "a:x", ":2", "0"])
def test_bad_slot_values(bad):
    with pytest.raises(ConfigError):
        load_config({}, {"AGENT_SLOTS": bad})


def test_local_runs_one_plugin(tmp_path, capsys):
    from agent import cli

    assert cli.main(["local", "--plugin", "ncsa.a,ncsa.b", "--out", str(tmp_path), "f.txt"]) == 2
    assert "local runs one plugin" in capsys.readouterr().err


def test_each_plugin_leases_from_its_own_relay_with_its_own_or_the_agent_wide_token():
    a, b = _plan({"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_SOURCE": "relay", "AGENT_RELAY_TOKEN_FILE": "/t",
                  "AGENT_PLUGINS": '{"ncsa.a": {"relay_url": "http://x:1"}, '
                                   '"ncsa.b": {"relay_url": "https://y:2", "relay_token_file": "/tb"}}'})
    assert (a.cfg.relay_url, a.cfg.relay_token_file) == ("http://x:1", "/t")
    assert (b.cfg.relay_url, b.cfg.relay_token_file) == ("https://y:2", "/tb")


def test_each_plugin_claims_from_its_own_spool_folder_the_agent_wide_one_by_default(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text(f"plugin: [ncsa.a, ncsa.b]\nsource: spool\nspool_dir: {tmp_path}/all\n"
                      f"plugins:\n  b: {{spool_dir: {tmp_path}/b}}\n")  # b: the folder name
    a, b = _plan({}, str(config))
    assert (a.cfg.spool_dir, b.cfg.spool_dir) == (f"{tmp_path}/all", f"{tmp_path}/b")


def test_without_any_relay_url_the_agent_wide_check_still_refuses():
    with pytest.raises(ConfigError, match="source relay needs relay_url"):
        load_config({}, {"AGENT_SOURCE": "relay", "AGENT_RELAY_TOKEN_FILE": "/t",
                         "AGENT_PLUGINS": '{"ncsa.a": {"slots": 2}}'})


def _file_plans(tmp_path, record):
    message = tmp_path / "m.json"
    message.write_text(json.dumps(record))
    cfg = load_config({}, {"AGENT_PLUGIN": "ncsa.a,ncsa.b", "AGENT_SOURCE": "file",
                           "AGENT_MESSAGE_FILE": str(message),
                           "AGENT_PLUGINS": '{"ncsa.b": {"rabbitmq_queue": "qb"}}'})
    return cfg, plan_plugins(cfg, _find, parse_setting)


def test_a_message_file_goes_to_the_plugin_that_consumes_its_queue(tmp_path):
    cfg, plans = _file_plans(tmp_path, {"body": "{}", "properties": {}, "queue": "qb"})
    assert [p.spec.name for p in source_kind("file").pick(cfg, plans)] == ["ncsa.b"]
    assert source_kind("file").pick(cfg, plans[:1]) == plans[:1]  # one plugin: whatever the file says


@pytest.mark.parametrize("record, expected", [
    ({"body": "{}", "properties": {}}, "names no queue"),
    ({"body": "{}", "properties": {}, "queue": "qc"}, "is for queue qc"),
])
def test_a_message_file_no_plugin_consumes_is_refused_naming_the_plugins(tmp_path, record, expected):
    cfg, plans = _file_plans(tmp_path, record)
    with pytest.raises(ConfigError) as err:
        source_kind("file").pick(cfg, plans)
    text = str(err.value)
    assert expected in text and "ncsa.a (ncsa.a), ncsa.b (qb)" in text and "\n" not in text
