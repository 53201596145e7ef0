"""A slot whose child's pipes are read by the main thread's event loop (agent.slots).

A real extractor process (tests/plugins/directive) against the loopback Clowder; the event loop
is the agent's SelectLoop (with RabbitMQ it is pika's IOLoop, agent.sources.amqp_connection).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import pytest

from agent import extractor_launch
from agent.config import AgentConfig
from agent.event_loop import SelectLoop
from agent.local_clowder import LocalClowder
from agent.local_run import _message
from agent.plugin_loader import find_plugin
from agent.plugin_settings import entry_defaults
from agent.slots import Slot
from agent.worker_settings import worker_env, worker_init
from hpc_common.redact import Redactor

PLUGINS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins")
KEY = "loop-mode-key"


class RecordingLoop(SelectLoop):
    """The agent's SelectLoop, recording the frames the slot hands to it and checking its watch set."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[dict[str, Any]] = []

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        assert fd not in self._watched
        super().watch(fd, on_readable)

    @property
    def watched(self) -> dict[int, Callable[[], None]]:
        return self._watched

    def on_frame(self, _slot: Slot, frame: dict[str, Any]) -> None:
        self.frames.append(frame)

    def until(self, done: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out; frames so far: {self.frames}"
            self.run_once(0.05)


@pytest.fixture
def clowder():
    with LocalClowder(KEY) as c:
        yield c


def _slot(loop: RecordingLoop, **limits: Any) -> Slot:
    cfg = AgentConfig(plugin="directive", plugin_path=[PLUGINS], **limits)
    spec = find_plugin("directive", cfg.plugin_path, entry_defaults(cfg))
    init, env = extractor_launch.apply(cfg, spec, worker_init(cfg, spec, spec.name), worker_env(cfg))
    slot = Slot(0, init, loop, loop.on_frame, Redactor(), env=env)
    slot.start()
    slot.wait_ready(timeout=120)
    return slot


def _job(clowder: LocalClowder, tmp_path, name: str, text: str) -> dict[str, Any]:
    path = tmp_path / name
    path.write_text(text)
    dataset = clowder.add_dataset(name)
    file_id = clowder.add_file(name, str(path), dataset)
    return _message(AgentConfig(), clowder.url, KEY, file_id, name, path.stat().st_size, dataset)


def _outcomes(loop: RecordingLoop) -> list[dict[str, Any]]:
    return [f for f in loop.frames if f["t"] in ("done", "died")]


def test_frames_arrive_in_order_through_the_loop_and_a_killed_child_is_replaced(clowder, tmp_path):
    loop = RecordingLoop()
    slot = _slot(loop)
    try:
        slot.assign("d1", _job(clowder, tmp_path, "a.txt", "ok\n"), 1)  # before the child is attached
        loop.until(lambda: len(_outcomes(loop)) == 1)
        kinds = [f["t"] for f in loop.frames]
        assert kinds[-1] == "done" and loop.frames[-1]["outcome"] == "ok", loop.frames
        assert kinds.count("status") >= 2 and set(kinds[:-1]) == {"status"}, kinds  # statuses first
        assert slot.busy_with == "d1"  # the Runner clears it; the slot only reports
        first_child = slot.proc.pid

        slot.assign("d2", _job(clowder, tmp_path, "b.txt", "sleep 30\n"), 2)
        loop.until(lambda: any(f["t"] == "status" for f in loop.frames[len(kinds):]))
        slot.kill("killed by the test")
        loop.until(lambda: len(_outcomes(loop)) == 2)
        assert _outcomes(loop)[1] == {"t": "died", "reason": "killed by the test"}

        slot.assign("d3", _job(clowder, tmp_path, "c.txt", "ok\n"), 3)  # waits for the new child
        loop.until(lambda: len(_outcomes(loop)) == 3)
        assert _outcomes(loop)[2]["t"] == "done" and _outcomes(loop)[2]["outcome"] == "ok"
        assert slot.proc.pid != first_child
    finally:
        slot.close()
    slot._thread.join(10)
    assert not slot._thread.is_alive() and slot.proc.poll() is not None
    assert loop.watched == {}


def test_recycle_after_gives_each_file_a_fresh_child(clowder, tmp_path):
    loop = RecordingLoop()
    slot = _slot(loop, recycle_after=1)
    pids = []
    try:
        for n in range(3):
            while slot._child is None:  # the next child is attached by a posted call
                loop.until(lambda: slot._child is not None)
            pids.append(slot._child.pid)
            slot.assign(f"d{n}", _job(clowder, tmp_path, f"f{n}.txt", "ok\n"), n)
            loop.until(lambda: len(_outcomes(loop)) == n + 1)
            assert _outcomes(loop)[n]["outcome"] == "ok"
    finally:
        slot.close()
    assert len(set(pids)) == 3, pids
