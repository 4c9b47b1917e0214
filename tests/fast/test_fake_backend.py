"""The fake backend queues beyond max_batch like the real one, so the fast tier sees waiting work."""

from __future__ import annotations

from engine_proc.backends.base import BackendConfig
from engine_proc.backends.fake import FakeBackend
from ipc.records import SamplingParams, Submit


def test_runs_at_most_max_batch_and_queues_the_rest_in_order() -> None:
    b = FakeBackend(BackendConfig(model_path="fake://", max_batch=2, options=(("delay_ms", "0"),)))
    b.load()
    for rid in (1, 2, 3, 4):
        b.submit(Submit(rid, SamplingParams(max_tokens=2), prompt=f"a{rid} b{rid} c{rid}"))
    assert {d.rid for d in b.step()} == {1, 2}
    assert b.occupancy() == (2, 2)
    b.abort(3)  # still waiting
    assert b.occupancy() == (2, 1)
    finished = [d.rid for d in b.step() if d.finish_reason]
    assert finished == [1, 2]
    assert {d.rid for d in b.step()} == {4}
    b.step()
    assert not b.has_work()
