"""``--devices cuda:0,cuda:1``: every GPU of one machine, without Ray.

One worker process per device (forked from a server process that imported torch and transformers
once, see :func:`worker_context`; never forked from this process, so each initialises its own CUDA)
runs the local executor's loop (decode threads → batches → out-of-memory halving and
bisecting of failing batches) over its own shard of the records, and sends each batch's
raw results back through a pipe. This process is the only writer: it commits each batch
to the one store and writes its sidecars as it arrives, and adds the workers' numbers into
one summary. Shards are interleaved (``todo[i::n]``), so a folder sorted by size or
subject spreads evenly over the devices.

A worker that dies (killed, out of host memory) is started again on what it had not
delivered, ``restarts`` times; after that its remaining images are recorded as failed
with the model-error note, so the next run tries them again. A killed parent loses only
batches in flight; the next run skips what the store has.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from captionkit.core.errors import CaptionkitError
from captionkit.core.records import Record
from captionkit.core.sinks import SidecarSink
from captionkit.core.store import Store
from captionkit.core.thread_tuning import decode_worker_limit
from captionkit.executors import light, on_device, portable, runs_on_device, use_device
from captionkit.executors.local import LocalExecutor, RunOptions, RunSummary, _StopFlag
from captionkit.executors.progress import Progress
from captionkit.steps.base import Prepared, Step

log = logging.getLogger(__name__)
LOST = ("lost: the worker on {device} died {times} times before finishing it; it is tried again on the "
        "next run")


PRELOAD = "captionkit.executors.worker_preload"


def worker_context() -> Any:
    """``forkserver`` with :mod:`~captionkit.executors.worker_preload` where the platform has it, else ``spawn``.

    A forked CUDA process cannot use the GPU, so workers are never forked from this process; the
    server is a fresh interpreter that imports the heavy packages once (without touching CUDA) and
    forks each worker from there: a worker, or a restarted one, starts at its model load instead of
    at ``import torch``. The server is started on the first run and serves every later one of this
    process (it keeps the environment variables of that moment, as a spawned worker keeps its own).
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows; macOS has it
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([PRELOAD])  # read when the server starts; once it runs, a no-op
    return context


def _worker_main(blob: bytes, device: str, records: list[Record], connection: Any, stop: Any, workers: int | None,
                 torch_threads: int | None, workers_limit: int | None = None) -> None:
    """In the worker process: load the step on ``device``, run the local loop, send every batch back."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (its stop event)
    try:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        step = pickle.loads(blob)
        use_device(step, device)
        started = time.perf_counter()
        step.load()
        meta = step.shared_meta() if hasattr(step, "shared_meta") else {}
        connection.send(("loaded", time.perf_counter() - started, meta))
        summary = RunSummary(field=step.field)
        runner = LocalExecutor(RunOptions(workers=workers, workers_limit=workers_limit, stop=stop))

        def deliver(items: list[Prepared], outcomes: list[tuple[bool, Any]], bad: list[tuple[Record, Any]]) -> None:
            connection.send(("batch", [light(item) for item in items], outcomes,
                             [(record, str(error)) for record, error in bad]))

        started = time.perf_counter()
        runner._batches(step, records, summary, deliver)
        connection.send(("done", {"busy_s": summary.model_busy_s, "wall_s": time.perf_counter() - started,
                                  "batch_size": step.batch_size, "cpu_threads": summary.model_cpu_threads,
                                  "decode_workers": summary.decode_workers, "device": device}))
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which decides
        try:
            connection.send(("error", f"{device}: {error}" if isinstance(error, CaptionkitError)
                             else f"{device}: {error!r}"))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        connection.close()


@dataclass
class _Worker:
    device: str
    records: list[Record]
    process: Any = None
    connection: Any = None
    deaths: int = 0
    loaded: bool = False  # this start of it sent "loaded"
    finished: bool = False
    delivered: set[str] = field(default_factory=set)

    def remaining(self) -> list[Record]:
        return [record for record in self.records if record.id not in self.delivered]


class DeviceExecutor(LocalExecutor):
    """Runs one step with one worker process per device over disjoint shards; this process writes everything."""

    def __init__(self, options: RunOptions | None = None, progress: Progress | None = None, *,
                 devices: list[str], restarts: int = 2) -> None:
        super().__init__(options, progress)
        if not devices:
            raise CaptionkitError("--devices: name at least one device, e.g. cuda:0,cuda:1.")
        self.devices = list(devices)
        self.restarts = restarts

    def worker_settings(self, step: Step) -> dict[str, Any] | None:
        """The fingerprint on the workers' devices, which must agree (cpu and cuda resolve dtype auto apart)."""
        if not runs_on_device(step):
            raise CaptionkitError(f"--devices: the {step.field} step does not run a model on this machine's "
                                  "devices; leave --devices out.")
        found: dict[str, dict[str, Any]] = {}
        for device in dict.fromkeys(self.devices):
            found[device] = on_device(step, device).fingerprint()
        first = next(iter(found.values()))
        if any(settings != first for settings in found.values()):
            raise CaptionkitError(f"--devices {','.join(self.devices)}: these devices would give different results "
                                  "(dtype auto is fp32 on a CPU and bf16/fp16 on a GPU); use devices of one kind "
                                  "or set --dtype.")
        return first

    def _execute(self, step: Step, todo: list[Record], store: Store, sink: SidecarSink | None,
                 summary: RunSummary, settings: dict, step_fingerprint: str,
                 signatures: dict[str, str | None]) -> None:
        context = worker_context()
        blob = portable(step)  # after classify: the per-image prompts it filled travel with it
        count = len(self.devices)
        on_cpu = sum(device == "cpu" for device in self.devices)
        torch_threads = max(1, (os.cpu_count() or 1) // on_cpu) if on_cpu else None
        if self.options.workers is None:  # measured in each worker, within its share of this machine's CPUs
            decode_workers, decode_limit = None, max(1, decode_worker_limit() // count)
        else:
            decode_workers = max(1, self.options.workers // count) if on_cpu else self.options.workers
            decode_limit = None
        stop_event = context.Event()
        workers = [_Worker(device, todo[index::count]) for index, device in enumerate(self.devices)]
        workers = [worker for worker in workers if worker.records]
        stats: list[dict[str, Any]] = []
        loads: list[float] = []

        def start(worker: _Worker) -> None:
            receive, send = context.Pipe(duplex=False)
            worker.process = context.Process(
                target=_worker_main, name=f"captionkit-{worker.device}", daemon=True,
                args=(blob, worker.device, worker.remaining(), send, stop_event, decode_workers,
                      torch_threads if worker.device == "cpu" else None, decode_limit))
            worker.loaded = False
            worker.process.start()
            send.close()  # the child holds the only writer: end of file means it ended
            worker.connection = receive

        def lose(worker: _Worker, why: str) -> None:
            remaining = worker.remaining()
            if not remaining:
                return
            log.warning("%d images %s", len(remaining), why)
            worker.delivered.update(record.id for record in remaining)
            items = [Prepared(record, None, (0, 0), "") for record in remaining]
            self._save(step, items, [(False, why)] * len(items), [], store, sink, summary, settings,
                       step_fingerprint, signatures)

        self.progress.start(len(todo), step.field)
        started = time.perf_counter()
        failure: str | None = None
        for worker in workers:
            start(worker)
        try:
            with _StopFlag(self.options.stop) as stop:
                while any(not worker.finished for worker in workers):
                    if stop.requested or failure is not None:
                        stop_event.set()
                    active = {worker.connection: worker for worker in workers if not worker.finished}
                    for connection in wait(list(active), timeout=0.5):
                        worker = active[connection]
                        try:
                            message = connection.recv()
                        except (EOFError, OSError, pickle.UnpicklingError):  # it ended (or died mid-message)
                            message = None
                        if message is None:
                            worker.process.join()
                            connection.close()
                            if worker.finished:
                                continue
                            worker.deaths += 1
                            if not worker.loaded and failure is None:  # never started: another try won't help
                                failure = (f"the worker process for {worker.device} exited (code "
                                           f"{worker.process.exitcode}) before its model loaded; its own "
                                           "error is above. From a Python script, start the run under "
                                           "`if __name__ == \"__main__\":` (workers are started in fresh processes).")
                            if stop_event.is_set() or failure is not None:
                                worker.finished = True
                            elif worker.deaths <= self.restarts and worker.remaining():
                                log.warning("the worker on %s died (exit code %s); starting it again on its %d "
                                            "remaining images", worker.device, worker.process.exitcode,
                                            len(worker.remaining()))
                                start(worker)
                            else:
                                lose(worker, LOST.format(device=worker.device, times=worker.deaths))
                                worker.finished = True
                            continue
                        kind = message[0]
                        if kind == "loaded":
                            worker.loaded = True
                            if worker.deaths == 0:  # start, imports and load, in parallel
                                loads.append(time.perf_counter() - started)
                            for key, value in message[2].items():
                                store.put_meta(key, value)
                        elif kind == "batch":
                            _, items, outcomes, bad = message
                            fresh = [(item, outcome) for item, outcome in zip(items, outcomes, strict=True)
                                     if item.record.id not in worker.delivered]
                            bad = [(record, why) for record, why in bad if record.id not in worker.delivered]
                            worker.delivered.update(item.record.id for item, _ in fresh)
                            worker.delivered.update(record.id for record, _ in bad)
                            self._save(step, [item for item, _ in fresh], [outcome for _, outcome in fresh], bad,
                                       store, sink, summary, settings, step_fingerprint, signatures)
                        elif kind == "done":
                            stats.append(message[1])
                            worker.finished = True
                        elif kind == "error":
                            failure = failure or message[1]
                            worker.finished = True
                summary.interrupted = stop.requested
        finally:
            stop_event.set()
            for worker in workers:
                if worker.process is not None and worker.process.is_alive():
                    worker.process.join(timeout=30)
                    if worker.process.is_alive():
                        worker.process.kill()
            self.progress.close()
        summary.model_load_s = max(loads, default=0.0)
        summary.processing_s = max(0.0, time.perf_counter() - started - summary.model_load_s)
        if stats:
            summary.model_busy_s = sum(item["busy_s"] for item in stats) / len(stats)
            summary.batch_size_final = min(item["batch_size"] for item in stats)
            summary.model_cpu_threads = stats[0]["cpu_threads"] or torch_threads
            summary.decode_workers = stats[0]["decode_workers"]
            log.info("model busy per device worker: %s", ", ".join(
                f"{item['device']} {item['busy_s'] / item['wall_s']:.2f}" if item["wall_s"] > 0 else item["device"]
                for item in stats))
        if failure is not None:
            raise CaptionkitError(failure)
