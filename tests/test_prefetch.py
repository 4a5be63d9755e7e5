"""The prefetch thread: batch N+1 gathered while batch N runs, with the same results, errors and stops."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from captionkit.core.errors import ImageLoadError
from captionkit.core.records import Record
from captionkit.core.store import Store
from captionkit.executors.local import LocalExecutor, RunOptions, RunSummary
from captionkit.executors.prefetch import Prefetcher
from captionkit.steps.base import Prepared


class _Step:
    """Bad files (ids ending in 3) fail to decode, ids ending in 7 make the model fail; ``stop`` is set at a call."""

    field = "caption"

    def __init__(self, batch_size: int = 4, stop: threading.Event | None = None, stop_at_call: int = 0,
                 failing: bool = True) -> None:
        self.batch_size = batch_size
        self.failing = failing
        self.calls = 0
        self.stop = stop
        self.stop_at_call = stop_at_call

    def fingerprint(self) -> dict[str, Any]:
        return {"model": "prefetch"}

    def render_settings(self) -> dict[str, Any]:
        return {}

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def prepare(self, record: Record) -> Prepared:
        if record.id.endswith("3"):
            raise ImageLoadError(record.id, "cannot identify image file", "Re-export it.")
        return Prepared(record, record.id.upper(), (1, 1), record.id)

    def run_batch(self, items: list[Prepared]) -> list[Any]:
        self.calls += 1
        if self.stop is not None and self.calls == self.stop_at_call:
            self.stop.set()
        if self.failing and any(item.record.id.endswith("7") for item in items):
            raise RuntimeError("the model failed")  # narrowed to the one image by halving
        return [f"text of {item.payload}" for item in items]

    def render(self, raw: Any) -> str:
        return str(raw)

    def recover_from_oom(self) -> None: ...


def _records(count: int) -> list[Record]:
    return [Record(f"r{index:03d}", None) for index in range(count)]


def _deliveries(prefetch: bool, count: int = 50) -> list[tuple]:
    delivered: list[tuple] = []

    def deliver(items, outcomes, bad):
        delivered.append(([item.record.id for item in items], outcomes, [(record.id, str(why)) for record, why in bad]))

    LocalExecutor(RunOptions(workers=3, prefetch=prefetch))._batches(_Step(), _records(count), RunSummary("caption"),
                                                                    deliver)
    return delivered


def _our_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("captionkit-")]


def test_batches_results_and_errors_are_the_same_with_and_without_the_prefetch_thread():
    with_prefetch, without = _deliveries(True), _deliveries(False)
    assert with_prefetch == without
    failed = [item for _, outcomes, _ in with_prefetch for item in outcomes if not item[0]]
    bad = [record_id for _, _, bad in with_prefetch for record_id, _ in bad]
    assert len(failed) == 5 and bad == [f"r{index:03d}" for index in range(50) if index % 10 == 3]
    assert not _our_threads()


def test_errors_in_prefetched_batches_are_reported_per_image(tmp_path):
    with Store(tmp_path) as store:
        summary = LocalExecutor(RunOptions(workers=2)).run(_Step(), _records(40), store, None)
    assert sorted(summary.errors) == sorted(f"r{index:03d}" for index in range(40) if index % 10 in (3, 7))
    assert summary.processed == 32 and summary.failed == 8
    assert not _our_threads()


def test_a_stop_ends_the_run_after_the_current_batch_even_with_a_batch_ready(tmp_path):
    stop = threading.Event()
    step = _Step(batch_size=4, stop=stop, stop_at_call=3, failing=False)
    with Store(tmp_path) as store:
        summary = LocalExecutor(RunOptions(workers=2, stop=stop)).run(step, _records(200), store, None)
        saved = {result.record_id for result in store.iter_results("caption")}
    assert summary.interrupted and step.calls == 3  # the batch waiting in the prefetch queue did not run
    assert saved == {f"r{index:03d}" for index in range(13)}  # three batches of 4 and the bad r003, nothing more
    assert not _our_threads()


def test_the_prefetcher_keeps_order_raises_the_producers_error_and_leaves_no_thread():
    closed = []

    def produce():
        try:
            yield 1
            yield 2
            raise ValueError("broken producer")
        finally:
            closed.append(True)

    seen = []
    with pytest.raises(ValueError, match="broken producer"), Prefetcher(produce()) as ahead:
        seen.extend(ahead)
    assert seen == [1, 2] and closed == [True] and not _our_threads()


def test_closing_the_prefetcher_early_stops_its_producer():
    produced = []

    def produce():
        try:
            for number in range(1000):
                produced.append(number)
                yield number
        finally:
            produced.append("closed")

    with Prefetcher(produce(), depth=1) as ahead:
        first = next(iter(ahead))
    assert first == 0 and produced[-1] == "closed" and len(produced) < 10 and not _our_threads()
