"""Every kind of slot the Runner drives offers the one interface, agent.slots.ExtractorSlot."""
from __future__ import annotations

import inspect

from agent.event_loop import SelectLoop
from agent.mpi_ranks import LaneSlot
from agent.slots import ExtractorSlot, Slot, StagedSlot
from hpc_common.redact import Redactor

METHODS = ("start", "wait_ready", "assign", "kill", "close")


def test_slots_and_mpi_lanes_share_the_interface():
    loop = SelectLoop()
    try:
        slots = [Slot(0, {}, loop, lambda *_: None, Redactor()), StagedSlot(1, {}, loop, lambda *_: None, Redactor()),
                 LaneSlot(2, leader=None)]  # type: ignore[arg-type]
        for slot in slots:
            assert isinstance(slot, ExtractorSlot), type(slot).__name__
            for name in METHODS:  # same parameters as the interface, not only the same names
                want = list(inspect.signature(getattr(ExtractorSlot, name)).parameters)[1:]
                got = list(inspect.signature(getattr(slot, name)).parameters)
                assert got == want, (type(slot).__name__, name, got, want)
            assert slot.busy_with is None and slot.started_at == 0.0
    finally:
        loop.close()
