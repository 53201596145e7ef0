"""The relay's own Prometheus metrics, served at GET /metrics on its port (behind its bearer token).

Leases by state are read from the lease table at each scrape; requests and forwarding errors are
counted as they are answered. Endpoint labels come from a fixed set, so a client probing random
paths cannot grow the number of series.
"""
from __future__ import annotations

import threading
from typing import Iterator

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from hpc_common import relay_api

# The relay's paths (hpc_common.relay_api) but /v1/backlog: the launcher's and idle agents' polls have
# always been counted under "other", and a label's values are part of the metric.
ENDPOINTS = frozenset(path for path in relay_api.PATHS if path != relay_api.BACKLOG)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RelayMetrics(Collector):
    """Counters updated by the request handlers, plus gauges read from the store on scrape."""

    def __init__(self, store, broker, queue: str) -> None:
        self.store, self.broker, self.queue = store, broker, queue
        self._lock = threading.Lock()
        self._requests: dict = {}
        self._forward_errors = 0
        self._inlined = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe(self, path: str, status: int, forwarded: bool) -> None:
        """Count one answered request; a forwarded Clowder call answered >= 500 is a forwarding error."""
        endpoint = "clowder" if forwarded else (path if path in ENDPOINTS else "other")
        with self._lock:
            key = (endpoint, str(status))
            self._requests[key] = self._requests.get(key, 0) + 1
            if forwarded and status >= 500:
                self._forward_errors += 1

    def inlined(self, files: int) -> None:
        """Count files sent inline with their lease (launcher.relay.inline)."""
        if files:
            with self._lock:
                self._inlined += files

    def render(self) -> bytes:
        """The Prometheus text exposition of everything above."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator:
        q = [self.queue]
        leases = GaugeMetricFamily("clowder_hpc_relay_messages", "Messages the relay holds, by state"
                                   " (ready: waiting for an agent, leased: out with one, dead: to be dead-lettered)",
                                   labels=["queue", "state"])
        for state, n in sorted(self.store.counts().items()):
            leases.add_metric(q + [state], n)
        yield leases
        up = GaugeMetricFamily("clowder_hpc_relay_broker_connected", "1 while the relay is connected to RabbitMQ",
                               labels=["queue"])
        up.add_metric(q, 1 if self.broker.connected.is_set() else 0)
        yield up
        with self._lock:
            requests, errors, inlined = dict(self._requests), self._forward_errors, self._inlined
        req = CounterMetricFamily("clowder_hpc_relay_requests", "HTTP requests answered, by endpoint and status",
                                  labels=["queue", "endpoint", "code"])
        for (endpoint, code), n in sorted(requests.items()):
            req.add_metric(q + [endpoint, code], n)
        yield req
        fwd = CounterMetricFamily("clowder_hpc_relay_forward_errors",
                                  "Forwarded Clowder calls that failed (answered 5xx: Clowder unreachable or failing)",
                                  labels=["queue"])
        fwd.add_metric(q, errors)
        yield fwd
        inl = CounterMetricFamily("clowder_hpc_relay_inline_files",
                                  "Files sent inline with their lease (no forwarded download for them)", labels=["queue"])
        inl.add_metric(q, inlined)
        yield inl
