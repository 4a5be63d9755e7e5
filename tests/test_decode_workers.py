"""Decode workers on the local executor: chosen by measurement by default, exactly --workers when given."""

from __future__ import annotations

import threading
import time
from typing import Any

from captionkit.core.records import Record
from captionkit.core.store import Store
from captionkit.executors.local import LocalExecutor, RunOptions
from captionkit.steps.base import Prepared


class _TimedStep:
    """A step whose decode and model take the given times (sleeps), counting decodes running at once."""

    field = "caption"

    def __init__(self, decode_s: float, model_s_per_image: float, batch_size: int = 8) -> None:
        self.decode_s = decode_s
        self.model_s_per_image = model_s_per_image
        self.batch_size = batch_size
        self.running = 0
        self.peak = 0
        self.peaks: list[int] = []  # the peak seen by each batch's decodes, in model order
        self._lock = threading.Lock()

    def fingerprint(self) -> dict[str, Any]:
        return {"model": "timed"}

    def render_settings(self) -> dict[str, Any]:
        return {}

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def prepare(self, record: Record) -> Prepared:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(self.decode_s)
        with self._lock:
            self.running -= 1
        return Prepared(record, record.id, (1, 1), record.id)

    def run_batch(self, items: list[Prepared]) -> list[Any]:
        time.sleep(self.model_s_per_image * len(items))
        with self._lock:
            self.peaks.append(self.peak)
            self.peak = self.running
        return [f"text of {item.record.id}" for item in items]

    def render(self, raw: Any) -> str:
        return str(raw)

    def recover_from_oom(self) -> None: ...


def _run(tmp_path, step: _TimedStep, options: RunOptions, count: int = 120):
    records = [Record(f"r{index:03d}", None) for index in range(count)]
    with Store(tmp_path) as store:
        summary = LocalExecutor(options).run(step, records, store, None)
    assert summary.processed == count and summary.failed == 0
    return summary


def test_slow_decoding_gets_more_workers_than_the_first_guess(tmp_path):
    step = _TimedStep(decode_s=0.02, model_s_per_image=0.0001)
    summary = _run(tmp_path, step, RunOptions(workers_limit=6), count=240)  # each setting is measured for 0.5 s
    assert summary.decode_workers == 6
    assert max(step.peaks) == 6  # the pool really ran six at once (the first guess is four)


def test_a_slow_model_gets_one_worker(tmp_path):
    step = _TimedStep(decode_s=0.001, model_s_per_image=0.01)
    summary = _run(tmp_path, step, RunOptions(workers_limit=6))
    assert summary.decode_workers == 1
    assert max(step.peaks[-3:]) <= 1  # once chosen, one decode at a time


def test_an_explicit_worker_count_is_kept_exactly(tmp_path):
    step = _TimedStep(decode_s=0.02, model_s_per_image=0.0001)
    summary = _run(tmp_path, step, RunOptions(workers=3, workers_limit=6))
    assert summary.decode_workers == 3
    assert max(step.peaks) == 3


def test_the_command_line_measures_decode_workers_unless_told(tmp_path, tiny_florence):
    import json
    import os

    from tests.images import write_good_images
    from tests.in_process import run_cli

    def summary(folder: str, *extra: str) -> dict:
        write_good_images(tmp_path / folder, 6)
        done = run_cli("caption", str(tmp_path / folder), "--model", str(tiny_florence), "--num-beams", "1",
                       "--max-new-tokens", "4", "--batch-size", "2", "--progress", "json", *extra,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines() if '"summary"' in line][-1]

    assert summary("told", "--workers", "3")["decode_workers"] == 3
    assert 1 <= summary("measured")["decode_workers"] <= len(os.sched_getaffinity(0))  # never above the CPUs


class _CpuTimedStep(_TimedStep):
    """The same, as a model on this machine's CPU with threads of its own (it shares the cores with decoding)."""

    def cpu_thread_candidates(self) -> list[int]:
        return [2, 1]

    def set_cpu_threads(self, count: int) -> None: ...


def test_a_model_on_the_cpu_starts_at_one_decode_worker(tmp_path):
    step = _CpuTimedStep(decode_s=0.001, model_s_per_image=0.01)
    summary = _run(tmp_path, step, RunOptions(workers_limit=6))
    assert summary.decode_workers == 1
    assert max(step.peaks) <= 1  # from the first batch on: no decode thread took a core from the model
