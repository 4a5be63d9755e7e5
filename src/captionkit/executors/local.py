"""The local executor: decode ahead in parallel workers, batch, keep the model busy, save often.

Flow per run: plan sidecars and detect collisions → ask the store what is already done
(same file, same settings) → render those without the model → stream the rest through a
thread pool that decodes and preprocesses ahead of the model → run batches on the main
thread (out-of-memory halves the batch; any other failure is narrowed to the one image
that caused it) → commit each batch to the store, then write its sidecars. Ctrl-C stops
after the current batch with everything so far saved.

A circuit breaker watches what is saved (every executor saves through ``_save``): when the
backend is clearly down (images in a row failing because the server cannot be reached, or
the model raising the same error for batch after batch), the run stops as Ctrl-C would and
``RunSummary.stopped_early`` says why in one sentence, instead of failing every remaining
image one by one.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from captionkit.core.errors import ImageLoadError
from captionkit.core.locations import RemoteError, as_image_error, read_bytes
from captionkit.core.records import Record, Source
from captionkit.core.sinks import SidecarSink
from captionkit.core.store import Result, Store, file_signature, fingerprint
from captionkit.core.thread_tuning import FIRST_GUESS, DecodeWorkerTuner, ThreadTuner, decode_worker_limit
from captionkit.executors.prefetch import DeviceStager, Prefetcher, device_stager
from captionkit.executors.progress import Progress
from captionkit.models.base import BACKEND_SCOPE, ITEM_SCOPE, MODEL_SCOPE, ItemFailure
from captionkit.steps.base import Prepared, Step, is_out_of_memory

log = logging.getLogger(__name__)
MODEL_ERROR = "model-error"


@dataclass
class RunOptions:
    """How the executor schedules work (not what the model does)."""

    workers: int | None = None  # decode/preprocess threads; None: chosen by measurement (DecodeWorkerTuner)
    workers_limit: int | None = None  # the most a measured choice may take (default: this process's CPUs)
    io_workers: int = 16  # object-store fetches in flight (remote images only; local files are read by decoders)
    prefetch_batches: int = 4
    prefetch: bool = True  # the next batch is gathered (and copied to the GPU) on a thread while the model runs
    saves_in_flight: int = 1  # batches whose store commit + sidecar writes may lag behind the model
    keep_results: bool = False  # reuse stored results made with other settings
    retry_errors: bool = False  # errors are retried anyway when the file changed
    stop: threading.Event | None = None  # set from another thread (the web UI's Stop): ends after the batch
    # circuit breaker: stop after this many images in a row could not reach the backend (server down, DNS, TLS)
    stop_after_unreachable: int = 8
    # ... or after this many in a row (and at least two batches) failed with the same model error
    stop_after_same_error: int = 16


@dataclass
class WorkPlan:
    """What a run will do, decided from the store before any model loads."""

    settings: dict[str, Any]
    step_fingerprint: str
    record_settings: dict[str, tuple[dict, str]] = field(default_factory=dict)  # id → (settings, fingerprint)
    signatures: dict[str, str | None] = field(default_factory=dict)
    reuse: dict[str, Any] = field(default_factory=dict)  # id → stored raw result
    todo: list[Record] = field(default_factory=list)
    failed_earlier: dict[str, str] = field(default_factory=dict)
    unfillable: dict[str, str] = field(default_factory=dict)  # id → why its per-record settings cannot be made


@dataclass
class RunSummary:
    """What happened, for the CLI summary, the JSON progress stream and library callers."""

    field: str
    total: int = 0
    processed: int = 0  # the model ran and succeeded
    reused: int = 0  # result already in the store with the same settings
    skipped: int = 0  # left alone by the existing-caption policy
    failed: int = 0
    failed_earlier: int = 0  # bad files from an earlier run, unchanged since: not retried
    files_written: int = 0
    elapsed_s: float = 0.0
    model_load_s: float = 0.0
    model_busy_s: float = 0.0
    processing_s: float = 0.0
    interrupted: bool = False  # Ctrl-C, the stop event, or the circuit breaker (then ``stopped_early`` says why)
    stopped_early: str | None = None  # the circuit breaker's one sentence: why the run stopped before the end
    errors: dict[str, str] = field(default_factory=dict)
    skipped_reasons: dict[str, str] = field(default_factory=dict)
    collisions: dict[str, list[str]] = field(default_factory=dict)
    write_errors: dict[str, str] = field(default_factory=dict)  # results stored, file not written
    batch_size_final: int = 0
    model_cpu_threads: int | None = None  # chosen by measurement when the model runs on a CPU
    decode_workers: int | None = None  # decode threads at the end: --workers, or chosen by measurement

    @property
    def images_per_s(self) -> float:
        return self.processed / self.processing_s if self.processing_s > 0 else 0.0

    @property
    def model_busy_fraction(self) -> float:
        return self.model_busy_s / self.processing_s if self.processing_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "field": self.field, "total": self.total, "processed": self.processed, "reused": self.reused,
            "skipped": self.skipped, "failed": self.failed, "failed_earlier": self.failed_earlier,
            "files_written": self.files_written,
            "elapsed_s": round(self.elapsed_s, 3), "model_load_s": round(self.model_load_s, 3),
            "processing_s": round(self.processing_s, 3), "images_per_s": round(self.images_per_s, 3),
            "model_busy_fraction": round(self.model_busy_fraction, 3), "interrupted": self.interrupted,
            "stopped_early": self.stopped_early,
            "batch_size_final": self.batch_size_final, "model_cpu_threads": self.model_cpu_threads,
            "decode_workers": self.decode_workers,
            "errors": self.errors,
            "skipped_reasons": self.skipped_reasons, "collisions": self.collisions,
            "write_errors": self.write_errors,
        }


def as_load_error(record: Record, error: BaseException) -> ImageLoadError:
    """What ``prepare`` raised, as the record's load error (a preprocessing bug included)."""
    if isinstance(error, ImageLoadError):
        return error
    return ImageLoadError(_where(record), f"preprocessing failed ({error!r})",
                          "Report this file to the captionkit developers.")


def _where(record: Record) -> str:
    """How messages name a record: its image (path or URL), or its id when it has none (text-only)."""
    return record.location or record.id


def _stored_path(record: Record) -> str:
    return record.location or ""


class _StopFlag:
    """First Ctrl-C (or ``event`` set by another thread): finish the current batch and stop; second: stop at once."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self._requested = False
        self._event = event
        self._previous: Any = None

    @property
    def requested(self) -> bool:
        return self._requested or (self._event is not None and self._event.is_set())

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self._requested:
            raise KeyboardInterrupt
        self._requested = True
        log.warning("Stopping after the current batch (press Ctrl-C again to stop at once).")

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _RunStop(threading.Event):
    """The stop signal executors watch during a run: set by the circuit breaker, or the caller's own event."""

    def __init__(self, caller: threading.Event | None) -> None:
        super().__init__()
        self.caller = caller

    def is_set(self) -> bool:
        return super().is_set() or (self.caller is not None and self.caller.is_set())


@dataclass
class _Group:
    """One batch as the model thread takes it: decoded items (staged), the bad files, per-image timings."""

    batch: list[Prepared]
    failures: list[tuple[Record, Any]]
    timings: list[tuple[float, int, float]]
    copied: Any = None  # the CUDA event of its pixels' copy to the device (DeviceStager)


def _stage(batch: list[Prepared], failures: list[tuple[Record, Any]], timings: list[tuple[float, int, float]],
           stager: DeviceStager | None) -> _Group:
    """A batch made ready for the model (on the prefetch thread): on CUDA, its pixels copied there ahead."""
    if stager is None or not batch:
        return _Group(batch, failures, timings)
    staged, event = stager.stage(batch)
    return _Group(staged, failures, timings, event)


class _DecodeGate:
    """How many decode workers run at once: changed while they run (a measured choice), closed at the end.

    The pool holds threads up to the limit a measured choice may take; the gate lets ``limit`` of them
    decode. A closed gate lets waiting tasks through at once without decoding (the run is over).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.closed = False
        self._changed = threading.Condition()

    def set_limit(self, limit: int) -> None:
        with self._changed:
            self.limit = limit
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def enter(self) -> int:
        """Wait for a free slot; the limit it was given under (0: the gate is closed, do not decode)."""
        with self._changed:
            while not self.closed and self.running >= self.limit:
                self._changed.wait()
            if self.closed:
                return 0
            self.running += 1
            return self.limit

    def leave(self) -> None:
        with self._changed:
            self.running -= 1
            self._changed.notify()


class CircuitBreaker:
    """Stops a run whose backend is clearly down, instead of failing every remaining image one by one.

    Fed every model outcome in the order saved. Bad files neither count nor reset it (they say
    nothing about the backend); any success, or a failure of one image only, resets it.
    """

    def __init__(self, unreachable_limit: int = 8, same_error_limit: int = 16) -> None:
        self.unreachable_limit = max(1, unreachable_limit)
        self.same_error_limit = max(1, same_error_limit)
        self.halt: threading.Event = threading.Event()
        self.reason: str | None = None
        self._unreachable = 0
        self._same = 0
        self._last: str | None = None

    @property
    def tripped(self) -> bool:
        return self.reason is not None

    def observe(self, failure: ItemFailure | None) -> None:
        """One image's outcome: None for a success."""
        if self.reason is not None:
            return
        if failure is None or failure.scope == ITEM_SCOPE:
            self._unreachable, self._same, self._last = 0, 0, None
            return
        self._unreachable = self._unreachable + 1 if failure.scope == BACKEND_SCOPE else 0
        self._same = self._same + 1 if failure.message == self._last else 1
        self._last = failure.message
        if self._unreachable >= self.unreachable_limit:
            count = self._unreachable
        elif self._same >= self.same_error_limit:
            count = self._same
        else:
            return
        self.reason = (f"Stopped early after {count} images in a row failed: {failure.message.rstrip('.')} "
                       "(everything finished is saved; a rerun tries the rest).")
        log.info("%s", self.reason)  # the caller prints it once (the CLI's summary, the UI's job log)
        self.halt.set()


class LocalExecutor:
    """Runs one step over records on this machine."""

    def __init__(self, options: RunOptions | None = None, progress: Progress | None = None) -> None:
        self.options = options or RunOptions()
        self.progress = progress or Progress("quiet")
        self.known_signatures: dict[str, str | None] = {}  # read while listing (elsewhere), by image path
        self.breaker = CircuitBreaker(self.options.stop_after_unreachable, self.options.stop_after_same_error)

    def list_records(self, source: Source) -> list[Record]:
        """The source's records (executors with workers elsewhere list in parallel there, in the same order)."""
        records = list(source)
        self.known_signatures.update(getattr(source, "signatures", {}))  # an object-store listing's ETags
        return records

    def _remote_signatures(self, records: list[Record]) -> None:
        """ETag/size/mtime of remote images not listed from a prefix (manifest rows): LIST pages of the prefixes
        they share, a HEAD for the rest, ``io_workers`` requests at a time (:func:`locations.signatures`).

        A missing object gets no signature (its load fails with a clear 404 error); a refused one (403)
        ends the run here, before any model loads, with one clear error.
        """
        from captionkit.core import locations

        wanted = [record.url for record in records if record.url is not None
                  and record.url not in self.known_signatures]
        if wanted:
            self.known_signatures.update(locations.signatures(wanted, self.options.io_workers))

    def classify(self, step: Step, records: list[Record], store: Store,
                 settings: dict[str, Any] | None = None) -> WorkPlan:
        """Which records need the model, which stored results are reused, which failed before (no writes).

        ``settings``: the step's fingerprint as the workers that run the model see it (a GPU
        worker resolves ``dtype auto`` differently from a CPU-only driver); default: this process's.
        """
        settings = step.fingerprint() if settings is None else settings
        step_fingerprint = fingerprint(settings)
        # Per-record settings (a prompt filled from the record's fields) join that record's fingerprint.
        per_record = step.record_settings(records) if hasattr(step, "record_settings") else {}
        plan = WorkPlan(settings=settings, step_fingerprint=step_fingerprint)
        for record_id, extra in per_record.items():
            if not isinstance(extra, str):
                merged = {**settings, "record": extra}
                plan.record_settings[record_id] = (merged, fingerprint(merged))
        stored = store.get_many(step.field, (record.id for record in records))
        self._remote_signatures(records)
        present = getattr(step, "outputs_present", None)  # a step that writes files: a result whose file is gone
        for record in records:
            listed = record.location or ""
            signature = self.known_signatures[listed] if listed in self.known_signatures \
                else file_signature(record.path)
            plan.signatures[record.id] = signature
            if isinstance(per_record.get(record.id), str):
                plan.unfillable[record.id] = str(per_record[record.id])
                continue
            record_fingerprint = plan.record_settings.get(record.id, (settings, step_fingerprint))[1]
            previous = stored.get(record.id)
            if (
                previous is not None
                and previous.status == "ok"
                and previous.file_signature == signature
                and (previous.fingerprint == record_fingerprint or self.options.keep_results)
                and (present is None or present(previous.raw))
            ):
                plan.reuse[record.id] = previous.raw
            elif previous is not None and previous.status == "error" and not self.options.retry_errors \
                    and MODEL_ERROR not in previous.notes \
                    and previous.file_signature == signature and previous.fingerprint == record_fingerprint:
                plan.failed_earlier[record.id] = previous.error or "failed earlier"
            else:
                plan.todo.append(record)
        return plan

    def run(self, step: Step, records: list[Record], store: Store, sink: SidecarSink | None) -> RunSummary:
        """Run ``step`` over ``records``; a circuit breaker that trips ends it like a stop request."""
        caller_options = self.options
        self.breaker = CircuitBreaker(caller_options.stop_after_unreachable,
                                      max(caller_options.stop_after_same_error, 2 * step.batch_size))
        run_stop = _RunStop(caller_options.stop)
        self.breaker.halt = run_stop  # every executor's stop check (``_StopFlag``) sees the breaker
        self.options = replace(caller_options, stop=run_stop)
        try:
            summary = self._run(step, records, store, sink)
        finally:
            self.options = caller_options
        if self.breaker.reason is not None:
            summary.stopped_early = self.breaker.reason
            summary.interrupted = True
        return summary

    def _run(self, step: Step, records: list[Record], store: Store, sink: SidecarSink | None) -> RunSummary:
        started = time.perf_counter()
        summary = RunSummary(field=step.field, total=len(records))
        plan = self.classify(step, records, store, self.worker_settings(step))
        settings, step_fingerprint, signatures = plan.settings, plan.step_fingerprint, plan.signatures
        self._record_settings = plan.record_settings
        if sink is not None:
            placed = sink.plan(records)
            summary.collisions = {str(path): ids for path, ids in placed.collisions.items()}
        reuse, todo = plan.reuse, plan.todo
        summary.failed += len(plan.failed_earlier)
        summary.failed_earlier += len(plan.failed_earlier)
        summary.errors.update(plan.failed_earlier)
        by_id = {record.id: record for record in records}
        unfillable = [by_id[record_id] for record_id in plan.unfillable]
        per_record = plan.unfillable
        if unfillable:
            failures = []
            for record in unfillable:
                error = self._error_result(step, record, str(per_record[record.id]), signatures, step_fingerprint,
                                           settings)
                error.notes = [MODEL_ERROR]  # about the record's fields, not the file: tried again next run
                failures.append(error)
                summary.errors[record.id] = str(per_record[record.id])
            store.put_results(failures)
            summary.failed += len(failures)
        if sink is not None and todo:
            leave = sink.wants_model([record.id for record in todo])
            summary.skipped = len(leave)
            summary.skipped_reasons = leave
            todo = [record for record in todo if record.id not in leave]
        summary.reused = len(reuse)
        if reuse:
            self._render({record_id: raw for record_id, raw in reuse.items()}, step, store, sink, summary)
        if todo:
            self._execute(step, todo, store, sink, summary, settings, step_fingerprint, signatures)
        summary.batch_size_final = summary.batch_size_final or step.batch_size
        if sink is not None:
            summary.write_errors = dict(sink.write_errors)
        summary.elapsed_s = time.perf_counter() - started
        return summary

    def worker_settings(self, step: Step) -> dict[str, Any] | None:
        """The step's fingerprint where the model runs; None: here (executors with workers elsewhere override)."""
        return None

    def _execute(self, step: Step, todo: list[Record], store: Store, sink: SidecarSink | None,
                 summary: RunSummary, settings: dict, step_fingerprint: str,
                 signatures: dict[str, str | None]) -> None:
        """Load the model and run it over ``todo``, committing batch by batch (other executors override this)."""
        load_started = time.perf_counter()
        step.load()
        summary.model_load_s = time.perf_counter() - load_started
        self._process(step, todo, store, sink, summary, settings, step_fingerprint, signatures)

    def _render(self, raws: dict[str, Any], step: Step, store: Store, sink: SidecarSink | None,
                summary: RunSummary) -> None:
        texts = {record_id: step.render(raw) for record_id, raw in raws.items()}
        store.set_texts(step.field, texts)
        if sink is not None:
            summary.files_written += sink.write(texts)

    def _prepared(self, step: Step, records: list[Record], pool: ThreadPoolExecutor, stop: _StopFlag,
                  gate: _DecodeGate) -> Iterator[tuple[Record, Prepared | ImageLoadError, tuple[float, int, float]]]:
        """Decode ahead in the pool, in order, keeping a bounded window of work in flight.

        Each outcome comes with (decode seconds, the worker count it was decoded at, seconds this
        thread waited for it): what the measured choice of decode workers needs.
        """
        window: deque[tuple[Record, Future, list]] = deque()
        upcoming = iter(records)
        ahead = max(1, step.batch_size * self.options.prefetch_batches)

        fetcher = ThreadPoolExecutor(max(1, self.options.io_workers), thread_name_prefix="captionkit-fetch") \
            if any(record.url is not None for record in records) else None

        def timed_prepare(record: Record, fetched: Future | None, info: list) -> Prepared:
            if fetched is not None:  # a remote image: its bytes were requested ahead, io_workers at a time
                try:
                    record = replace(record, data=fetched.result())
                except RemoteError as error:
                    raise as_image_error(record.url or record.id, error) from error
            workers = gate.enter()
            if workers == 0:
                raise CancelledError  # the run is over: nobody reads this
            started = time.perf_counter()
            try:
                prepared = step.prepare(record)
                if fetched is not None:
                    prepared.record = replace(prepared.record, data=None)  # the bytes are decoded: free them
                return prepared
            finally:
                info[0], info[1] = time.perf_counter() - started, workers
                gate.leave()

        def submit(record: Record) -> tuple[Record, Future, list]:
            fetched = fetcher.submit(read_bytes, record.url) if fetcher is not None and record.url else None
            info = [0.0, 0]
            return record, pool.submit(timed_prepare, record, fetched, info), info

        for record in upcoming:
            window.append(submit(record))
            if len(window) >= ahead:
                break
        try:
            while window:
                record, future, info = window.popleft()
                waiting = time.perf_counter()
                try:
                    outcome: Prepared | ImageLoadError = future.result()
                except Exception as error:  # a bad file, or a preprocessing bug: never the end of the run
                    outcome = as_load_error(record, error)
                yield record, outcome, (info[0], info[1], time.perf_counter() - waiting)
                if stop.requested:
                    return
                following = next(upcoming, None)
                if following is not None:
                    window.append(submit(following))
        finally:
            gate.close()  # tasks waiting for a slot end without decoding
            for _, pending, _ in window:
                pending.cancel()
            if fetcher is not None:
                fetcher.shutdown(wait=False, cancel_futures=True)

    def _process(self, step: Step, records: list[Record], store: Store, sink: SidecarSink | None,
                 summary: RunSummary, settings: dict, step_fingerprint: str,
                 signatures: dict[str, str | None]) -> None:
        self.progress.start(len(records), f"{step.field}")
        started = time.perf_counter()

        def save(items: list[Prepared], outcomes: list[tuple[bool, Any]], bad: list[tuple[Record, Any]]) -> None:
            self._save(step, items, outcomes, bad, store, sink, summary, settings, step_fingerprint, signatures)

        self._batches(step, records, summary, save)
        self.progress.close()
        summary.processing_s = time.perf_counter() - started

    def _batches(self, step: Step, records: list[Record], summary: RunSummary,
                 deliver: Callable[[list[Prepared], list[tuple[bool, Any]], list[tuple[Record, Any]]], None]) -> None:
        """Decode ahead in threads, run batches on this thread, hand each batch's outcomes to ``deliver``.

        ``deliver(items, outcomes, bad)`` runs on one writer thread, at most ``saves_in_flight``
        batches behind the model. Ctrl-C (or the stop event) ends the loop after the current batch.
        """
        explicit = self.options.workers
        limit = max(1, explicit) if explicit is not None else \
            max(1, self.options.workers_limit or decode_worker_limit())
        candidates = step.cpu_thread_candidates() if hasattr(step, "cpu_thread_candidates") else []
        # A model on this CPU with threads of its own shares the cores with the decode threads: start at one
        # and add workers where decoding is measured to hold it up (the first guess cost 5-7% on short runs)
        first = 1 if candidates else min(FIRST_GUESS, limit)
        gate = _DecodeGate(limit if explicit is not None else first)
        workers = DecodeWorkerTuner(limit, gate.set_limit, start=gate.limit) if explicit is None else None
        tuner = ThreadTuner(candidates, step.set_cpu_threads if candidates else lambda threads: None)
        stager = device_stager(step) if self.options.prefetch else None
        last_flush = [time.perf_counter()]
        saving: deque[Future] = deque()
        previous_failed = [False]  # the last batch failed entirely: its save may trip the circuit breaker

        def groups(pool: ThreadPoolExecutor, stop: _StopFlag) -> Iterator[_Group]:
            """Decoded images grouped into batches (on the prefetch thread), each staged for the model."""
            batch: list[Prepared] = []
            failures: list[tuple[Record, Any]] = []
            timings: list[tuple[float, int, float]] = []  # per image: decode s, decoded at (workers), waited s
            stream = self._prepared(step, records, pool, stop, gate)
            try:
                for record, prepared, timing in stream:
                    if isinstance(prepared, ImageLoadError):
                        failures.append((record, prepared))
                    else:
                        batch.append(prepared)
                    timings.append(timing)
                    if len(batch) >= step.batch_size or len(failures) >= step.batch_size or stop.requested:
                        yield _stage(batch, failures, timings, stager)
                        batch, failures, timings = [], [], []
                    if stop.requested:
                        return
                if batch or failures:
                    yield _stage(batch, failures, timings, stager)
            finally:
                stream.close()  # cancels decoding that is queued but not started

        def flush(group: _Group, waited_s: float) -> None:
            """Run the model on the batch on this thread; hand saving to the writer thread."""
            batch, failures, timings = group.batch, group.failures, group.timings
            tuner.before_batch()  # one choice at a time: the model's CPU threads (if any) first, then decode workers
            busy_before = summary.model_busy_s
            if previous_failed[0]:
                while saving:  # let the breaker see that batch before the model runs another
                    saving.popleft().result()
            if self.breaker.tripped:
                batch = []  # not tried: the next run does them
            if batch and group.copied is not None and stager is not None:
                stager.wait(group.copied)
            outcomes = self._run_batch(step, batch, summary) if batch else []
            previous_failed[0] = bool(outcomes) and all(
                not ok or (isinstance(value, ItemFailure) and value.scope != ITEM_SCOPE) for ok, value in outcomes)
            saving.append(writer.submit(deliver, list(batch), outcomes, list(failures)))
            while len(saving) > self.options.saves_in_flight or (saving and saving[0].done()):
                saving.popleft().result()  # bounded: a kill loses at most the batches in flight
            now = time.perf_counter()
            model_s = summary.model_busy_s - busy_before
            decoded = [timing for timing in timings if timing[1] > 0]
            decode_s = sum(timing[0] for timing in decoded)
            if not tuner.done:
                tuner.after_batch(len(batch), now - last_flush[0], model_s,
                                  decode_s / len(decoded) if decoded else 0.0)
            elif workers is not None and not workers.done:
                workers.after_batch(len(decoded), now - last_flush[0], model_s, decode_s, waited_s,
                                    {timing[1] for timing in decoded})
            last_flush[0] = now

        with _StopFlag(self.options.stop) as stop, ThreadPoolExecutor(limit, thread_name_prefix="captionkit-decode") \
                as pool, ThreadPoolExecutor(1, thread_name_prefix="captionkit-save") as writer:
            ready: Iterator[_Group]
            ahead = Prefetcher(groups(pool, stop)) if self.options.prefetch else None
            ready = iter(ahead) if ahead is not None else groups(pool, stop)
            try:
                for group in ready:
                    flush(group, ahead.waited_s if ahead is not None else 0.0)
                    if stop.requested:
                        break
            finally:
                if ahead is not None:
                    ahead.close()  # the producer ends after the item it is on; its thread is joined
                else:
                    ready.close()  # type: ignore[attr-defined]
                while saving:
                    saving.popleft().result()
            summary.interrupted = stop.requested
        summary.model_cpu_threads = tuner.chosen
        summary.decode_workers = gate.limit
        if workers is not None and not workers.done:
            log.info("decode workers: %d (the run ended before the measured choice settled)", gate.limit)
        if candidates:
            step.set_cpu_threads(candidates[0])  # leave the process as it was

    def _save(self, step: Step, items: list[Prepared], outcomes: list[tuple[bool, Any]],
              bad: list[tuple[Record, Any]], store: Store, sink: SidecarSink | None, summary: RunSummary,
              settings: dict, step_fingerprint: str, signatures: dict[str, str | None]) -> None:
        """Render, commit one batch to the store, then write its sidecars; every executor saves through here.

        ``items`` need only ``record``, ``content_hash`` and ``notes`` (workers elsewhere send them
        without their payload); ``bad`` pairs records with why they could not be decoded.
        """
        results: list[Result] = []
        texts: dict[str, str] = {}
        for record, error in bad:
            record_settings, record_fingerprint = self._record_settings.get(record.id, (settings, step_fingerprint))
            results.append(self._error_result(step, record, str(error), signatures, record_fingerprint,
                                              record_settings))
            summary.errors[record.id] = str(error)
            log.info("failed: %s", error)
        for item, (ok, value) in zip(items, outcomes, strict=True):
            record = item.record
            record_settings, record_fingerprint = self._record_settings.get(record.id, (settings, step_fingerprint))
            failure = value if isinstance(value, ItemFailure) else None if ok else ItemFailure(str(value))
            self.breaker.observe(failure)
            if failure is not None:  # the batch ran (or was lost); this one image did not succeed
                ok, value = False, failure.message
            if ok:
                text = step.render(value)
                texts[record.id] = text
                results.append(Result(
                    step=step.field, record_id=record.id, path=_stored_path(record),
                    file_signature=signatures.get(record.id), content_hash=item.content_hash,
                    fingerprint=record_fingerprint, settings=record_settings, status="ok", raw=value,
                    text=text, error=None, notes=item.notes, updated_at=0.0,
                ))
                log.debug("%s %s: %s", step.field, record.id, text)
            else:
                message = f"{_where(record)}: {value}"
                summary.errors[record.id] = message
                log.info("failed: %s", message)
                error = self._error_result(step, record, message, signatures, record_fingerprint, record_settings)
                error.notes = [MODEL_ERROR]  # about the run, not the file: retried next time
                results.append(error)
        store.put_results(results)
        if sink is not None and texts:
            summary.files_written += sink.write(texts)
        summary.processed += len(texts)
        summary.failed += len(results) - len(texts)
        last = items[-1].record.id if items else (bad[-1][0].id if bad else None)
        self.progress.advance(summary.processed, summary.failed, len(results), current=last)

    def _run_batch(self, step: Step, items: list[Prepared], summary: RunSummary) -> list[tuple[bool, Any]]:
        """Run the model; halve on out-of-memory, and narrow other failures down to single images."""
        started = time.perf_counter()
        try:
            raws = step.run_batch(items)
            summary.model_busy_s += time.perf_counter() - started
            return [(True, raw) for raw in raws]
        except Exception as error:
            summary.model_busy_s += time.perf_counter() - started
            if is_out_of_memory(error):
                step.recover_from_oom()
                if len(items) == 1:
                    return [(False, ItemFailure("out of memory even with batch size 1; use a smaller model or dtype",
                                                scope=MODEL_SCOPE))]
                half = max(1, len(items) // 2)
                if step.batch_size > half:
                    log.warning("Out of memory with a batch of %d; retrying with %d (and keeping that size).",
                                len(items), half)
                    step.batch_size = half
                return self._run_batch(step, items[:half], summary) + self._run_batch(step, items[half:], summary)
            if len(items) == 1:
                return [(False, ItemFailure(f"model failed on this image ({error!r})", scope=MODEL_SCOPE))]
            half = len(items) // 2
            log.warning("A batch of %d failed (%r); retrying in halves to find the image that causes it.",
                        len(items), error)
            return self._run_batch(step, items[:half], summary) + self._run_batch(step, items[half:], summary)

    @staticmethod
    def _error_result(step: Step, record: Record, message: str, signatures: dict[str, str | None],
                      step_fingerprint: str, settings: dict) -> Result:
        return Result(
            step=step.field, record_id=record.id, path=_stored_path(record),
            file_signature=signatures.get(record.id), content_hash=None, fingerprint=step_fingerprint,
            settings=settings, status="error", raw=None, text=None, error=message, notes=[], updated_at=0.0,
        )
