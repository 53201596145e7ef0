"""Prometheus metrics for the launcher: ``python -m launcher metrics --bind HOST:PORT``.

A custom collector builds the same status snapshot as ``status --json`` on every scrape (settings
read again, a fresh ledger connection), so nothing goes stale between scrapes. Names and meanings
are listed in launcher/README.md ("Metrics"); every per-queue sample carries a ``queue`` label.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Iterator, Optional, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from launcher.errors import ConfigError
from launcher.states import JobState, TERMINAL_STATES
from launcher.strategy import Case

log = logging.getLogger("launcher")

#: returns (status snapshot as `status --json` prints it, ledger) or raises
Snapshot = Callable[[], Tuple[dict, object]]


class BindError(ConfigError):
    """--bind is malformed or the address cannot be listened on."""


def parse_bind(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6; port 0 picks a free one)."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise BindError(f"--bind {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]"), int(port)


class LauncherCollector(Collector):
    """Turns one status snapshot (plus ledger totals) into metric families, at scrape time."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator:
        up = GaugeMetricFamily("clowder_hpc_scrape_ok",
                               "1 when the launcher's ledger and settings could be read for this scrape")
        try:
            data, ledger = self.snapshot()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer; the reason goes to the log
            log.warning("metrics scrape failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        try:
            yield from families(data, ledger)
        finally:
            close = getattr(ledger, "close", None)
            if close:
                close()
        up.add_metric([], 1)
        yield up


def families(data: dict, ledger) -> Iterator:
    """Metric families for one snapshot (``data`` as status --json) and its ledger."""
    broker = data.get("broker") or {}
    queue = broker.get("queue") or ""
    q = [queue]

    broker_up = GaugeMetricFamily("clowder_hpc_broker_up", "1 when RabbitMQ answered the queue query",
                                  labels=["queue"])
    broker_up.add_metric(q, 0 if "error" in broker else 1)
    yield broker_up
    backlog = (data.get("backlog") or {}).get("total")
    if backlog is not None and "error" not in broker:  # without RabbitMQ's count the total is not known
        g = GaugeMetricFamily("clowder_hpc_backlog", "Files waiting for the launcher's agents (backlog total)",
                              labels=["queue"])
        g.add_metric(q, backlog)
        yield g
    for key, name, text in (("ready", "clowder_hpc_broker_ready", "Messages ready in the RabbitMQ queue"),
                            ("unacked", "clowder_hpc_broker_unacked",
                             "Messages delivered and not yet acknowledged (management API only)"),
                            ("consumers", "clowder_hpc_broker_consumers", "Consumers on the queue")):
        if broker.get(key) is not None:
            g = GaugeMetricFamily(name, text, labels=["queue"])
            g.add_metric(q, broker[key])
            yield g

    registered = (data.get("registration") or {})
    if registered.get("last_at") is not None:
        g = GaugeMetricFamily("clowder_hpc_registration_timestamp_seconds",
                              "Unix time the scale loop last registered the extractor on the 'extractors' exchange",
                              labels=["queue"])
        for name in registered.get("queues") or {}:
            g.add_metric([name], registered["last_at"])
        yield g

    tasks = GaugeMetricFamily(
        "clowder_hpc_tasks", "Array tasks per normalized state: open tasks for queued/running/missing,"
        " tasks seen in the current budget period for terminal states", labels=["state"])
    now_counts, period_counts = data.get("tasks") or {}, data.get("tasks_this_period") or {}
    for state in JobState:
        source = period_counts if state in TERMINAL_STATES else now_counts
        tasks.add_metric([state.value], source.get(state.value, 0))
    yield tasks

    totals = ledger.report_totals(queue or None)
    dispatch_dead = ledger.dispatch_counts().get("dead_lettered", 0)
    for name, text, value in (
            ("clowder_hpc_files_done", "Files the agents finished successfully (from their reports)",
             totals["done"]),
            ("clowder_hpc_files_failed", "Failed attempts the agents reported (a retried file counts each time)",
             totals["failed"]),
            ("clowder_hpc_dead_lettered", "Messages sent to error.<queue> by agents or by dispatch",
             totals["dead_lettered"] + dispatch_dead),
            ("clowder_hpc_busy_seconds", "Extractor-seconds the agents spent on files", totals["busy_seconds"])):
        c = CounterMetricFamily(name, text, labels=["queue"])
        c.add_metric(q, value)
        yield c

    per_file = broker.get("per_file_seconds")
    if per_file is not None:
        g = GaugeMetricFamily("clowder_hpc_seconds_per_file", "Mean seconds per file the agents reported recently",
                              labels=["queue"])
        g.add_metric(q, per_file)
        yield g
    if data.get("files_per_minute") is not None:
        g = GaugeMetricFamily("clowder_hpc_files_per_minute", "Recent throughput (source as in status)",
                              labels=["queue"])
        g.add_metric(q, data["files_per_minute"])
        yield g

    nh = data.get("node_hours") or {}
    for key, name, text in (("used", "clowder_hpc_node_hours_used", "Node-hours used in the budget period"),
                            ("committed", "clowder_hpc_node_hours_committed",
                             "Node-hours used plus what open tasks may still use"),
                            ("budget", "clowder_hpc_node_hours_budget", "Node-hour budget of the period (caps)")):
        if nh.get(key) is not None:
            g = GaugeMetricFamily(name, text)
            g.add_metric([], nh[key])
            yield g

    decisions = CounterMetricFamily("clowder_hpc_scale_decisions", "Scaling decisions recorded, per case",
                                    labels=["case"])
    counts = {c.value: 0 for c in Case}
    counts.update(ledger.decision_counts())
    for case, n in sorted(counts.items()):
        decisions.add_metric([case], n)
    yield decisions


def registry_for(snapshot: Snapshot) -> CollectorRegistry:
    """A registry holding only the launcher collector (no process/platform defaults)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LauncherCollector(snapshot))
    return registry


def serve(bind: str, registry: CollectorRegistry) -> Tuple[object, threading.Thread, int]:
    """Start serving /metrics in a daemon thread; returns (server, thread, bound port)."""
    from prometheus_client import start_http_server

    host, port = parse_bind(bind)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise BindError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    bound = server.server_address[1]
    log.info("metrics served on http://%s:%d/metrics", host, bound)
    return server, thread, bound


def announce(host_port: str, bound: int, stream) -> None:
    """The one line a person (or a test) reads to find the port when --bind ended in :0."""
    host, _ = parse_bind(host_port)
    shown = f"[{host}]" if ":" in host else host
    print(f"metrics: serving http://{shown}:{bound}/metrics", file=stream, flush=True)


def wait(stop: threading.Event, server: Optional[object]) -> None:
    """Block until ``stop`` is set, then close the server."""
    stop.wait()
    if server is not None:
        server.shutdown()
        server.server_close()
