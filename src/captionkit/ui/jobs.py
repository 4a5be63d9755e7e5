"""Background jobs for the web UI: one worker, one resident model, progress any page can read.

Why a job manager and not work inside the request handlers: a caption run over 50,000
images outlives the browser tab that started it. Jobs run on one worker thread owned by
the process, so closing the page, reloading it or opening a second tab shows the same
job; the page only polls :meth:`Job.snapshot`. One worker also means two jobs never
share (or fight over) a model: a second job waits in the queue, or is refused with a
message when the queue is full.

The resident model: caption jobs ask :class:`ResidentModel` for a backend built by
:func:`captionkit.api.build_captioner` and pass that same object to
:func:`captionkit.api.caption`, so a Preview and the full run that follows load the
model once. Asking for other options unloads the previous backend first (its memory is
freed before the next one loads); tag, training and pipeline jobs, which load their own
models inside the library, release the resident one before they start.

Nothing here imports gradio: the manager is tested on its own.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from captionkit.core.errors import CaptionkitError
from captionkit.models import release as free_attributes

log = logging.getLogger("captionkit.ui")

QUEUED, RUNNING, STOPPING = "queued", "running", "stopping"
DONE, STOPPED, FAILED, CANCELLED = "done", "stopped", "failed", "cancelled"
FINISHED_STATES = (DONE, STOPPED, FAILED, CANCELLED)
LOG_LINES = 2000


class JobRefused(CaptionkitError):
    """A job was not accepted: the queue is full (the message says what is running)."""


def default_log_file() -> Path:
    """Where unexpected errors' full reports go (the page shows one line and this path)."""
    import os

    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".cache")
    return base / "captionkit" / "ui.log"


def plain_error(error: BaseException, log_file: Path | None = None) -> str:
    """One sentence for the page: the library's own message, or what happened and where the details are."""
    import sqlite3

    from captionkit.steps.base import is_out_of_memory

    if is_out_of_memory(error):
        return ("Out of memory: the model or batch does not fit. Lower the batch size, pick a smaller model or "
                "--dtype bf16/fp16, or close other programs using the GPU, then start again (finished work is kept).")
    if isinstance(error, CaptionkitError):
        return str(error)
    from captionkit.core.environment import broken_environment

    if (broken := broken_environment(error)) is not None:  # a package failing to import, not the user's files
        return str(broken)
    try:
        from captionkit.train.config import ConfigError

        if isinstance(error, ConfigError):
            return f"Training config: {error}"
    except ImportError:  # pragma: no cover - the train package is part of the base install
        pass
    if isinstance(error, sqlite3.Error):
        from captionkit.core.environment import is_storage_problem

        hint = " Check free space and permissions, or write elsewhere with an output folder."
        return (f"The captionkit store (.captionkit/store.sqlite in the output folder) failed: {error}."
                + (hint if is_storage_problem(error) else ""))
    if isinstance(error, ModuleNotFoundError):
        name = error.name or "a package"
        return f"A package this needs is not installed ({name}). Run: pip install 'captionkit[all]'"
    if isinstance(error, OSError):  # the free-space hint only where the error is about writing
        from captionkit.core.environment import describe_os_error

        return describe_os_error(error).replace("--output-dir", "an output folder")
    where = f" The full report is in {log_file}." if log_file is not None else ""
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return f"Unexpected error ({type(error).__name__}: {first}).{where}"


@dataclasses.dataclass
class Job:
    """One unit of work and everything a page shows about it (read through :meth:`snapshot`)."""

    id: str
    kind: str  # caption, preview, tag, render, pipeline, train-captioner, train-tagger, ...
    title: str
    work: Callable[[Job], Any]
    loads_own_model: bool = False  # tag, train, pipeline: free the resident captioner first
    state: str = QUEUED
    phase: str = "waiting in the queue"
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: dict[str, Any] = dataclasses.field(default_factory=dict)
    summary: dict[str, Any] | None = None
    message: str = ""
    result: Any = None
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. a training run's output folder
    lines: deque = dataclasses.field(default_factory=lambda: deque(maxlen=LOG_LINES))
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    # --- written by the worker ----------------------------------------------------------------
    def log(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with self._lock:
            self.lines.append(f"{stamp} {text}")

    def set_phase(self, text: str) -> None:
        with self._lock:
            self.phase = text
        self.log(text)

    def on_event(self, event: dict[str, Any]) -> None:
        """The library's progress listener (start / progress / summary / step events)."""
        kind = event.get("event")
        with self._lock:
            if kind == "start":
                self.progress = {"done": 0, "failed": 0, "total": int(event.get("total") or 0), "current": None,
                                 "images_per_s": 0.0, "eta_s": None}
                self.phase = "running the model"
            elif kind == "progress":
                self.progress = {key: event.get(key) for key in
                                 ("done", "failed", "total", "current", "images_per_s", "eta_s")}
            elif kind == "summary":
                self.summary = {key: value for key, value in event.items() if key != "event"}
            elif kind == "step":
                self.phase = f"step {event.get('index')} ({event.get('name')}): {event.get('total')} records"
                self.progress = {}
        if kind == "step":
            self.log(self.phase)
        elif kind == "summary":
            self.log(summary_line(event))

    # --- read by pages --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = time.time()
            return {
                "id": self.id, "kind": self.kind, "title": self.title, "state": self.state, "phase": self.phase,
                "progress": dict(self.progress), "summary": dict(self.summary) if self.summary else None,
                "message": self.message, "log": list(self.lines),
                "elapsed_s": ((self.finished or now) - self.started) if self.started else 0.0,
                "finished": self.state in FINISHED_STATES, "stop_requested": self.stop.is_set(),
                "info": dict(self.info),
            }

    @property
    def finished_state(self) -> bool:
        return self.state in FINISHED_STATES


def summary_line(summary: dict[str, Any]) -> str:
    """The CLI's one-line run summary, from a summary event or RunSummary.as_dict()."""
    if "processed" not in summary:
        return "finished"
    text = (f"{summary.get('field', 'run')}: {summary.get('processed', 0)} done, {summary.get('reused', 0)} already "
            f"done, {summary.get('skipped', 0)} skipped, {summary.get('failed', 0)} failed of "
            f"{summary.get('total', 0)} in {float(summary.get('elapsed_s') or 0):.1f}s "
            f"({float(summary.get('images_per_s') or 0):.2f} images/s, "
            f"{summary.get('files_written', 0)} files written)")
    if summary.get("stopped_early"):  # the circuit breaker: the cause, in its one sentence
        text += f"; {summary['stopped_early']}"
    elif summary.get("interrupted"):
        text += "; stopped early: everything finished so far is saved, start again to continue"
    return text


def is_run_summary(value: Any) -> bool:
    return isinstance(value, dict) and "processed" in value and "reused" in value


def readable(value: Any) -> str:
    """A dict a library log line carries (a run summary, a pipeline step's report) as words, not Python."""
    if not isinstance(value, dict):
        return str(value)
    if is_run_summary(value):
        return summary_line(value)
    if {"index", "name", "todo", "processed"} <= set(value):  # a pipeline step's report (the line names the step)
        text = f"{value['processed']} done, {value.get('done', 0)} already done, {value.get('failed', 0)} failed"
        if value.get("dropped"):
            text += f", {value['dropped']} dropped"
        return text + f" in {float(value.get('elapsed_s') or 0):.1f}s"
    parts = []
    for key, item in value.items():
        name = str(key).replace("_", " ")
        if isinstance(item, (dict, list, tuple, set)):
            parts.append(f"{name}: {len(item)}")
        elif item is not None and item != "":
            parts.append(f"{name} {item}")
    return ", ".join(parts)


class ResidentModel:
    """At most one captioner backend loaded at a time, kept between jobs with the same options.

    Only the job worker calls :meth:`acquire` and :meth:`release`; pages read :meth:`describe`.
    """

    def __init__(self, builder: Callable[[Any], Any] | None = None) -> None:
        self._builder = builder
        self.backend: Any = None
        self.key: str | None = None
        self.label: str | None = None
        self.loads = 0
        self.unloads = 0

    @staticmethod
    def options_key(options: Any) -> str:
        values = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
        return json.dumps(values, sort_keys=True, default=str)

    def acquire(self, options: Any, job: Job | None = None) -> Any:
        """The backend for ``options``: the resident one when the options match, else a new one (the old freed)."""
        key = self.options_key(options)
        if self.backend is not None and key == self.key:
            if job is not None:
                job.log(f"model {self.label} is already loaded")
            return self.backend
        self.release(job)
        if self._builder is not None:
            backend = self._builder(options)
        else:
            from captionkit import api

            backend = api.build_captioner(options=options)
        self.backend, self.key = backend, key
        self.label = str(getattr(options, "model", None) or getattr(options, "adapter", None) or "the default model")
        self.loads += 1
        return backend

    def release(self, job: Job | None = None) -> None:
        """Unload the resident backend and free its memory (host and GPU)."""
        backend, label = self.backend, self.label
        self.key = self.label = None
        if backend is None:
            return
        try:
            backend.unload()
        finally:
            del backend
            free_attributes(self, "backend")  # the last reference; a full collection only for a cycle left
            self.unloads += 1
            if job is not None:
                job.log(f"unloaded model {label}")

    def describe(self) -> str:
        return f"resident model: {self.label}" if self.backend is not None else "no model loaded"


class _JobLogHandler(logging.Handler):
    """Routes the ``captionkit`` loggers' records to the running job's log panel."""

    def __init__(self, manager: JobManager) -> None:
        super().__init__(logging.INFO)
        self.manager = manager
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        job = self.manager.running
        if job is None or record.name.startswith("captionkit.ui"):
            return
        try:
            arguments = record.args
            if isinstance(arguments, dict) and "%(" not in str(record.msg):
                arguments = (arguments,)  # logging unwraps a lone dict argument: log.info("summary: %s", summary)
            if isinstance(arguments, tuple) and any(is_run_summary(argument) for argument in arguments):
                return  # the summary event logs the same run summary as one sentence
            if isinstance(arguments, tuple) and any(isinstance(argument, dict) for argument in arguments):
                record = logging.makeLogRecord({**record.__dict__, "args": tuple(map(readable, arguments))})
            job.log(self.format(record).splitlines()[0][:500])
        except Exception:  # a log line must never break a job
            pass


class JobManager:
    """Runs jobs one at a time on a background thread; queues (or refuses) the rest.

    ``max_queued`` jobs may wait behind the running one; beyond that :meth:`submit`
    raises :class:`JobRefused` with a message naming what runs. ``max_queued=0`` refuses
    any job while one runs.
    """

    def __init__(self, max_queued: int = 4, log_file: Path | None = None, builder=None, history: int = 50) -> None:
        self.max_queued = max_queued
        self.log_file = Path(log_file) if log_file is not None else default_log_file()
        self.models = ResidentModel(builder)
        self._pending: deque[Job] = deque()
        self._jobs: deque[Job] = deque(maxlen=history)
        self._condition = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.running: Job | None = None
        package = logging.getLogger("captionkit")
        if package.getEffectiveLevel() > logging.INFO:
            package.setLevel(logging.INFO)
        self._handler = _JobLogHandler(self)
        package.addHandler(self._handler)

    # --- submitting and stopping ----------------------------------------------------------------
    def submit(self, kind: str, title: str, work: Callable[[Job], Any], loads_own_model: bool = False) -> Job:
        with self._condition:
            if self._closed:
                raise JobRefused("The job manager is shut down; restart `captionkit ui`.")
            ahead = [*([self.running] if self.running is not None else []), *self._pending]
            if ahead and len(self._pending) >= self.max_queued:
                first = ahead[0]
                doing = "is running" if first is self.running else "is starting"
                waiting = f" and {len(ahead) - 1} more waiting" if len(ahead) > 1 else ""
                raise JobRefused(f"Not started: {first.title} {doing}{waiting}. Wait for it to finish or stop it, "
                                 "then start again.")
            job = Job(id=f"{next(self._ids)}", kind=kind, title=title, work=work, loads_own_model=loads_own_model)
            if ahead:
                job.phase = f"queued: waits for {ahead[-1].title}"
            job.log(f"submitted: {title}")
            self._pending.append(job)
            self._jobs.append(job)
            self._ensure_worker()
            self._condition.notify_all()
            return job

    def stop(self, job_id: str | None = None) -> Job | None:
        """Stop a job: the running one ends after its current batch; a queued one is cancelled."""
        with self._condition:
            job = self.running if job_id is None else self.get(job_id)
            if job is None:
                return None
            if job in self._pending:
                self._pending.remove(job)
                with job._lock:
                    job.state, job.phase, job.finished = CANCELLED, "cancelled before it started", time.time()
                job.log("cancelled before it started")
                self._condition.notify_all()
                return job
            if job.state == RUNNING:
                job.stop.set()
                with job._lock:
                    job.state = STOPPING
                    job.phase = "stopping after the current batch (finished work is kept)"
                job.log(job.phase)
            return job

    # --- reading --------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        return next((job for job in self._jobs if job.id == job_id), None)

    def jobs(self) -> list[Job]:
        return list(self._jobs)

    def queued(self) -> list[Job]:
        with self._condition:
            return list(self._pending)

    def latest(self, kinds: tuple[str, ...] | None = None) -> Job | None:
        """The running job if any (of these kinds), else the most recent one."""
        running = self.running
        if running is not None and (kinds is None or running.kind in kinds):
            return running
        for job in reversed(self._jobs):
            if kinds is None or job.kind in kinds:
                return job
        return None

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Block until ``job`` finished (True) or the timeout passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while not job.finished_state:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(remaining if remaining is not None else 1.0)
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while self.running is not None or self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(remaining if remaining is not None else 1.0)
        return True

    def close(self) -> None:
        """Refuse new jobs, cancel the queued ones and ask the running one to stop; returns at once.

        ``captionkit ui`` calls this before it closes the server, which may wait seconds for open
        pages: the job must not run on meanwhile.
        """
        with self._condition:
            self._closed = True
            for job in list(self._pending):
                self.stop(job.id)
            if self.running is not None:
                self.stop(self.running.id)
            self._condition.notify_all()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the running job, cancel the queue, wait for the job's current batch, free the model."""
        self.close()
        if self._thread is not None:
            self._thread.join(timeout)
        self.models.release()
        logging.getLogger("captionkit").removeHandler(self._handler)

    # --- the worker -----------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="captionkit-ui-jobs", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if not self._pending:
                    return
                job = self._pending.popleft()
                self.running = job
                with job._lock:
                    job.state, job.started, job.phase = RUNNING, time.time(), "starting"
            self._run(job)
            with self._condition:
                self.running = None
                self._condition.notify_all()

    def _run(self, job: Job) -> None:
        job.log(f"started: {job.title}")
        try:
            if job.loads_own_model:  # one model resident at a time: the library loads this job's own
                self.models.release(job)
            result = job.work(job)
            finished_anyway = isinstance(result, dict) and result.get("interrupted") is False
            state = STOPPED if job.stop.is_set() and not finished_anyway else DONE
            with job._lock:
                job.result = result
                if not job.message:
                    if job.summary is not None:
                        job.message = summary_line(job.summary)
                    elif isinstance(result, str):
                        job.message = result
                    else:
                        job.message = "finished" if state == DONE else "stopped: finished work is kept"
        except BaseException as error:  # a job never takes the worker (or the page) down with it
            state = FAILED
            message = plain_error(error, self.log_file)
            with job._lock:
                job.message = message
            job.log(f"error: {message}")
            self._write_report(job, error)
            if job.kind in ("caption", "preview"):  # a half-loaded model is not worth keeping
                try:
                    self.models.release(job)
                except Exception:  # pragma: no cover
                    pass
        finally:
            gc.collect()
        with job._lock:
            job.state, job.finished = state, time.time()
            job.phase = {DONE: "done", STOPPED: "stopped (finished work is kept)", FAILED: "failed"}[state]
        job.log(f"{job.phase}: {job.message}")

    def _write_report(self, job: Job, error: BaseException) -> None:
        """The traceback goes to the log file, never to the page."""
        try:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with self.log_file.open("a", encoding="utf-8") as stream:
                stream.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} job {job.id} ({job.title}) failed\n")
                stream.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        except OSError:
            log.exception("job %s failed", job.id)
