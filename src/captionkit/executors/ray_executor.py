"""``--executor ray``: the same steps on a Ray cluster, with Ray Data streaming between a CPU and a model stage.

Flow: the driver lists the records (folders by Ray tasks in parallel, manifests by Ray
Data's readers: :mod:`captionkit.executors.ray_sources`) and asks the store what is done,
as the local executor does, then streams the rest through a Ray Dataset:

    records → [CPU stage: tasks, step.prepare = decode + preprocess, pixels packed to uint8]
            → [model stage: actor pool, one loaded model per actor, step.run_batch]
            → driver: commit each block to the store, then write its sidecars

The step object is the one ``captionkit caption``/``tag``/``run`` builds; it is pickled
before it loads (steps leave their store and loaded model out of the pickle) and every
task or actor loads its own copy. The CPU stage loads only what ``prepare`` needs
(``load_preprocessing``: Florence-2's processor, a tagger's preprocessing; chat VLMs need
nothing); steps without it prepare inside the model actors, on ``cpus_per_actor`` threads.
Prepared pixels travel as uint8 codes with exact per-channel tables
(:mod:`captionkit.executors.transport`): a quarter of float32, the same bits.

Fault tolerance: an actor that dies (killed, out of memory, its node gone, or an image that
crashes it) is restarted in place by Ray and the (at most two) blocks it held run once more in
the pool; a block whose actor dies again is recorded as lost, and when the dataset is done the
driver runs the lost images again on one actor of its own, halving a group that kills it, so an
image that crashes its worker loses only itself (after ``batch_retries`` tries alone). Deaths
while loading the model are counted (:class:`StartLedger`) and end the run after ``INIT_DEATHS``
in a row; a run in which nothing moves for ``stall_timeout_s`` ends with :class:`RayStalledError`.
The driver is the only writer and commits each block once, so every image is saved exactly once
and no file is half written. An image that still fails is recorded as failed with the model-
error note (tried again on the next run), never a job failure. A killed driver loses only the
blocks in flight: the next run skips what the store has.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import re
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from captionkit.core import locations
from captionkit.core.errors import CaptionkitError, StoppedEarlyError, require
from captionkit.core.records import Record, Source
from captionkit.core.sinks import SidecarSink
from captionkit.core.store import Store
from captionkit.executors import light, on_device, portable, runs_on_device, use_device
from captionkit.executors.local import LocalExecutor, RunOptions, RunSummary, _StopFlag, as_load_error
from captionkit.executors.progress import Progress
from captionkit.executors.transport import pack_prepared, unpack_prepared
from captionkit.steps.base import Prepared, Step

log = logging.getLogger(__name__)
ISOLATION_WAIT_S = 120  # for a model actor to be placed before the lost images wait for the next run
RELEASE_WAIT_S = 30  # for a finished dataset's actors to give back their resources
MODEL_STAGE_CONCURRENCY = 2  # batches per model actor at once (see ModelActor)
POOL_TASK_RETRIES = 1  # a block whose actor died runs once more in the pool, then goes to _isolate
INIT_DEATHS = 3  # model actors that may die in a row while loading the model before the run stops
STALL_TIMEOUT_S = 600.0  # --ray-stall-timeout: no block moved and no result for this long ends the run
LOST = ("lost on the cluster: its worker died each time it ran (with its batch, then {retries} times alone: a "
        "crash in the model or the decoder on this image, or a node that went away); it is tried again on the "
        "next run")


def require_ray():
    """``import ray`` (with Ray Data), or the install hint."""
    ray = require("ray", "--executor ray", extra="ray")
    require("ray.data", "--executor ray", extra="ray", package="ray[data]")
    return ray


def _dumps(value: Any) -> bytes:
    import ray

    return ray.cloudpickle.dumps(value)


def _table(ids: list[str], blobs: list[bytes], stats: list[bytes] | None = None):
    import pyarrow as pa

    columns = {"id": pa.array(ids, pa.string()), "blob": pa.array(blobs, pa.large_binary())}
    if stats is not None:
        columns["stats"] = pa.array(stats, pa.large_binary())
    return pa.table(columns)


def _records_table(records: list[Record]):
    import pyarrow as pa

    return pa.table({"id": pa.array([record.id for record in records], pa.string()),
                     "record": pa.array([pickle.dumps(record) for record in records], pa.large_binary())})


def _prepare_all(step: Step, records: list[Record], threads: int, remote: RemoteAccess | None = None) -> list[tuple]:
    """``step.prepare`` over records on ``threads`` threads: ("ok", Prepared) or ("bad", record, why).

    Remote images' bytes are fetched here, on the worker, ``remote.io_workers`` at a time (never via the driver).
    """
    fetched: dict[str, Any] = {}
    if remote is not None:
        locations.set_default_storage_options(remote.storage_options)
        fetched = locations.fetch_all([record.url for record in records if record.url], remote.io_workers)

    def one(record: Record) -> tuple:
        try:
            data = fetched.get(record.url) if record.url is not None else None
            if isinstance(data, locations.RemoteError):
                raise locations.as_image_error(record.url or record.id, data)
            if data is not None:
                record = replace(record, data=data)
            prepared = step.prepare(record)
            if data is not None:
                prepared.record = replace(prepared.record, data=None)
            return ("ok", prepared)
        except Exception as error:  # a bad file (or a preprocessing bug) is that record's failure
            return ("bad", record, str(as_load_error(record, error)))

    if threads <= 1 or len(records) <= 1:
        return [one(record) for record in records]
    with ThreadPoolExecutor(threads, thread_name_prefix="captionkit-decode") as pool:
        return list(pool.map(one, records))


# ---------------------------------------------------------------------------------------- CPU stage
_DECODERS: dict[str, Step] = {}  # per worker process: steps whose preprocessing is loaded, by pickle hash


@dataclass(frozen=True)
class RemoteAccess:
    """How workers reach object storage: the run's storage options (kept in memory only) and fetch concurrency."""

    storage_options: dict[str, Any]
    io_workers: int


def decode_batch(table, blob: bytes, threads: int, remote: RemoteAccess | None = None):
    """CPU stage (Ray tasks): records → prepared items, with only the step's preprocessing loaded."""
    key = hashlib.sha1(blob).hexdigest()
    step = _DECODERS.get(key)
    if step is None:
        step = pickle.loads(blob)
        step.load_preprocessing()
        _DECODERS.clear()  # one run's step at a time per worker process
        _DECODERS[key] = step
    records = [pickle.loads(value) for value in table.column("record").to_pylist()]
    entries = [(entry[0], pack_prepared(entry[1])) if entry[0] == "ok" else entry
               for entry in _prepare_all(step, records, threads, remote)]
    return _table([record.id for record in records], [pickle.dumps(entry) for entry in entries])


def _in_remote_shard(record: Record) -> bool:
    """A sample of a WebDataset shard in object storage: its workers need the run's storage options."""
    from captionkit.core.webdataset import ShardMember

    return isinstance(record.path, ShardMember) and locations.is_url(record.path.shard)


# ---------------------------------------------------------------------------------------- output shards
def write_shard_task(job: Any, storage_options: dict[str, Any]) -> str:
    """A Ray task: one output shard, its input shard read here (see :func:`captionkit.core.webdataset.write_shard`)."""
    from captionkit.core.webdataset import write_shard

    locations.set_default_storage_options(storage_options)
    return write_shard(job)


class RayShardWriter:
    """Output shards written by Ray tasks (the :class:`~captionkit.core.webdataset.ShardSink` writer on Ray).

    Each task reads its input shard (local, remote or compressed) and writes the output shard itself, so
    no image byte passes through the driver: the driver sends each task the kept keys and their texts
    only. A URL ``--output-dir`` is uploaded to from whichever node runs the task; a local one is the
    driver's folder, so those tasks run on the driver's node (bytes go from that node's disk or network
    to its disk, still not through the driver process). Ray Data's ``write_webdataset`` does not fit:
    it names and cuts files by block, not one output shard per input shard with the same keys.
    """

    def __init__(self, ray: Any, storage_options: dict[str, Any]) -> None:
        self.ray = ray
        self.storage_options = storage_options
        self.task = ray.remote(num_cpus=0.25, max_retries=2)(write_shard_task)
        self.node = ray.get_runtime_context().get_node_id()
        self.pending: dict[Any, Any] = {}

    def submit(self, jobs: list[Any]) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        for job in jobs:
            task = self.task
            if not locations.is_url(str(job.target)):
                task = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(self.node, soft=False))
            self.pending[task.remote(job, self.storage_options)] = job

    def collect(self, wait: bool) -> list[tuple[Any, str | None]]:
        """Tasks finished since the last call (all of them with ``wait``): (job, None) or (job, why it failed)."""
        if not self.pending:
            return []
        ready, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=None if wait else 0)
        done: list[tuple[Any, str | None]] = []
        for reference in ready:
            job = self.pending.pop(reference)
            try:
                self.ray.get(reference)
                done.append((job, None))
            except self.ray.exceptions.RayError as error:
                done.append((job, str(worker_error(error))))
        return done


# -------------------------------------------------------------------------------------- model stage
class StartLedger:
    """Counts model actors killed while loading the model, per pass (a tiny Ray actor: one per driver and cluster).

    Ray restarts a killed model actor whatever it was doing (``max_restarts=-1``), which would retry a
    load that is killed every time (the out-of-memory killer, say) forever. Each actor reports the start
    and the end of its load; a start of an actor whose last load never ended is a death while loading.
    After ``INIT_DEATHS`` of those in a row (no load finished in between), the next actor does not load
    and every batch it gets answers with the reason, which stops the run.

    Every pass (a Ray Data run, a rerun of lost images) of the driver uses the same ledger under a token
    of its own (:func:`_open_pass`), forgotten when the pass ends: a ledger per pass cost a worker process
    start (~1 s of CPU) each time, per run and per pipeline step.
    """

    def __init__(self) -> None:
        _leave_before_exit_handlers()
        self.passes: dict[str, _PassStarts] = {}

    def open(self, token: str) -> bool:
        """A pass begins (answers once the ledger is up, so the driver knows it is alive)."""
        self.passes[token] = _PassStarts()
        return True

    def starting(self, token: str, actor_id: str, handle: Any = None) -> int | None:
        """Deaths while loading in a row in this pass, counting the one this start follows (if any);
        ``None`` when the pass has ended (an actor restarted after it: it has nothing to do)."""
        starts = self.passes.get(token)
        if starts is None:
            return None
        if actor_id in starts.loading:
            starts.deaths += 1
        starts.loading.add(actor_id)
        if handle is not None:
            starts.handles[actor_id] = handle
        return starts.deaths

    def loaded(self, token: str, actor_id: str) -> None:
        starts = self.passes.get(token)
        if starts is not None:
            starts.loading.discard(actor_id)
            starts.deaths = 0

    def close(self, token: str) -> list[Any]:
        """The pass has ended: forget it; every model actor that started in it (handles), for the driver to end."""
        starts = self.passes.pop(token, None)
        return list(starts.handles.values()) if starts is not None else []


@dataclass
class _PassStarts:
    """One pass's model actor starts, in the :class:`StartLedger`."""

    loading: set[str] = field(default_factory=set)
    deaths: int = 0
    handles: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassLedger:
    """What a pass's model actors report their starts to: the driver's ledger and the pass's token."""

    actor: Any
    token: str


_LEDGER: dict[str, Any] = {}  # this driver's StartLedger: {"cluster": the connection it belongs to, "actor": handle}
_LEDGER_LOCK = threading.Lock()


def _connection(ray: Any) -> tuple[str, ...]:
    """This driver's connection: a new ``ray.init`` (another job, or a new local instance) is another one."""
    context = ray.get_runtime_context()
    return (str(getattr(context, "gcs_address", "")), str(context.get_job_id()), str(context.get_node_id()))


def _open_pass(ray: Any) -> PassLedger:
    """A token for one pass in this driver's :class:`StartLedger`, started on first use.

    The ledger is an actor of this driver's job: it ends with the connection (``ray.shutdown``), so one
    kept from an earlier connection, or one that died, is replaced, not reused.
    """
    token = uuid.uuid4().hex
    with _LEDGER_LOCK:
        connection = _connection(ray)
        ledger = _LEDGER.get("actor") if _LEDGER.get("cluster") == connection else None
        if ledger is not None:
            try:
                ray.get(ledger.open.remote(token))
            except ray.exceptions.RayActorError:  # killed: a new one
                ledger = None
        if ledger is None:
            ledger = ray.remote(num_cpus=0)(StartLedger).remote()
            ray.get(ledger.open.remote(token))
            _LEDGER.update(cluster=connection, actor=ledger)
        return PassLedger(ledger, token)


def _leave_before_exit_handlers() -> None:
    """Make this worker process leave with ``os._exit(0)`` once its task loop has ended cleanly.

    Why: Ray 2.60's worker runs its C++ exit handler after that (``~CoreWorkerProcessImpl``), and now and
    then it deadlocks there (gdb: the scheduler's mutex taken twice while a pub-sub publisher is destroyed).
    The process then stays for good, with the loaded model's memory (a GPU's on a cluster), while Ray counts
    its CPUs and GPUs free for the next actor. By then the core worker has shut down, told the raylet and
    killed its children, so nothing is lost by leaving at once. Only the clean end is handled
    (``Worker.main_loop`` calls ``sys.exit(0)`` when the task loop returns); any other exit runs as Ray
    intends. The handler is registered at that ``sys.exit`` call, so it runs before every other one. Only
    in an actor's own process (never a driver's).
    """
    import atexit

    import ray

    real_exit = sys.exit
    if getattr(real_exit, "captionkit_leaves", False) or ray.get_runtime_context().get_actor_id() is None:
        return

    def leave() -> None:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)

    def exit(status: object = None) -> None:
        if status in (0, None):
            atexit.register(leave)
        real_exit(status)

    exit.captionkit_leaves = True  # type: ignore[attr-defined]
    sys.exit = exit


class ModelActor:
    """Model stage (a Ray actor pool): one loaded model per actor; batches come prepared or are prepared here."""

    def __init__(self, blob: bytes, device: str | None, prepared_upstream: bool, threads: int,
                 ledger: PassLedger | None = None, remote: RemoteAccess | None = None) -> None:
        import ray

        started = time.perf_counter()
        _leave_before_exit_handlers()
        context = ray.get_runtime_context()
        actor_id = context.get_actor_id()
        deaths = 0
        if ledger is not None:
            deaths = ray.get(ledger.actor.starting.remote(ledger.token, actor_id, context.current_actor))
            if deaths is None:  # restarted after its pass ended: end for good instead of loading a model
                ray.actor.exit_actor()
        self.step = pickle.loads(blob)
        if device is not None and runs_on_device(self.step):
            use_device(self.step, device)
        self.load_error: str | None = None
        if deaths > INIT_DEATHS:
            self.load_error = (f"--executor ray: the model actors died {deaths} times in a row while loading the "
                               "model (killed, out of host or GPU memory, or a crash in native code); nothing "
                               "more was run. Give each actor more memory or put fewer on a node; Ray's logs "
                               "name the cause.")
        else:
            try:
                self.step.load()
                if ledger is not None:
                    ray.get(ledger.actor.loaded.remote(ledger.token, actor_id))
            except Exception as error:  # every batch answers with it and the driver stops the run: an actor
                # that died here would be restarted and the same error paid for again
                log.exception("the model did not load")
                self.load_error = (f"{error} (on a Ray worker)" if isinstance(error, CaptionkitError) else
                                   f"a Ray worker could not load the model: {type(error).__name__}: {error}")
        self.load_s = time.perf_counter() - started
        self.prepared_upstream = prepared_upstream
        self.threads = threads
        self.remote = remote
        self.runner = LocalExecutor(RunOptions(workers=threads))
        self.calls = 0
        # Ray Data hands an actor MODEL_STAGE_CONCURRENCY batches at once: one unpacks or prepares on a
        # thread while another runs the model; the model itself runs one batch at a time.
        self._model = threading.Lock()

    def ready(self) -> bool:
        """Answers once the model is loaded."""
        return True

    def run(self, table):
        """One batch, called directly on an actor of the driver's own (``__call__`` is Ray Data's entry)."""
        return self(table)

    def __call__(self, table):
        import os

        ids = table.column("id").to_pylist()
        if self.load_error is not None:
            return _table(ids, [pickle.dumps(("fatal", self.load_error))] * len(ids), [b""] * len(ids))
        if self.prepared_upstream:
            entries = [pickle.loads(value) for value in table.column("blob").to_pylist()]
            entries = [(entry[0], unpack_prepared(entry[1])) if entry[0] == "ok" else entry for entry in entries]
        else:
            records = [pickle.loads(value) for value in table.column("record").to_pylist()]
            entries = _prepare_all(self.step, records, self.threads, self.remote)
        items = [entry[1] for entry in entries if entry[0] == "ok"]
        summary = RunSummary(field=self.step.field)
        outcomes: list[tuple[bool, Any]] = []
        with self._model:
            try:
                for start in range(0, len(items), max(1, self.step.batch_size)):  # after an OOM, the smaller size
                    outcomes.extend(self.runner._run_batch(self.step, items[start:start + self.step.batch_size],
                                                           summary))
            except Exception as error:  # not the model (that is narrowed per image): never a lost block
                message = f"the model stage failed ({error!r})"
                outcomes.extend((False, message) for _ in items[len(outcomes):])
            first, self.calls = self.calls == 0, self.calls + 1
        results = iter(outcomes)
        rows: dict[str, bytes] = {}
        for entry in entries:
            if entry[0] == "ok":
                ok, value = next(results)
                rows[entry[1].record.id] = pickle.dumps(("done", light(entry[1]), ok, value))
            else:
                rows[entry[1].id] = pickle.dumps(entry)
        stats = {"actor": os.getpid(), "busy_s": summary.model_busy_s, "batch_size": self.step.batch_size,
                 "load_s": self.load_s if first else 0.0}
        return _table(ids, [rows[record_id] for record_id in ids],
                      [pickle.dumps(stats)] + [b""] * (len(ids) - 1))


def probe(blob: bytes, device: str | None, with_meta: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """On a worker: the step's fingerprint there, and (``with_meta``) the store metadata its results need.

    ``shared_meta`` reads what it can from the model's files (a tagger's tag list) without the weights.
    """
    step = pickle.loads(blob)
    if device is not None and runs_on_device(step):
        use_device(step, device)
    settings = step.fingerprint()
    return settings, (step.shared_meta() if with_meta else {})


# ------------------------------------------------------------------------------------------- driver
def _back(ray: Any, actor: Any) -> bool:
    """Wait until a starting or restarting actor answers (a call made while it restarts can fail at once)."""
    deadline = time.monotonic() + ISOLATION_WAIT_S
    while time.monotonic() < deadline:
        try:
            return bool(ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic())))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            time.sleep(0.2)
        except ray.exceptions.GetTimeoutError:
            return False
    return False


def _halves(group: list[Record]) -> list[list[Record]]:
    """A group in two (one image stays one)."""
    half = (len(group) + 1) // 2
    return [part for part in (group[:half], group[half:]) if part]


def _end_actors(ray: Any, ledger: PassLedger) -> None:
    """Close the pass in the ledger and kill a finished dataset's model actors now.

    Ray Data (2.60) stops the actors of its pool when the dataset ends, but not one that died and was
    restarted: that one stayed alive, holding its CPUs and GPUs until the driver exited, so the next
    dataset (the rerun of lost images, the next step, the next run of a process that runs several)
    waited for resources that never came back. One that restarts after this ends itself (the ledger
    no longer knows its pass).
    """
    try:
        handles = ray.get(ledger.actor.close.remote(ledger.token), timeout=RELEASE_WAIT_S)
    except ray.exceptions.RayError:  # the ledger is gone: nothing to name
        handles = []
    for handle in handles:
        with contextlib.suppress(ray.exceptions.RayError, ValueError):
            ray.kill(handle, no_restart=True)


def _release(ray: Any, free: dict[str, float]) -> None:
    """Wait (briefly) until a finished dataset's actors have given back their CPUs and GPUs.

    Ray Data stops its actor pool when the dataset's executor is collected, which a reference
    cycle can put off until the next garbage collection; meanwhile a next dataset that needs
    those CPUs for its decode stage waits for them forever (seen here with Ray 2.60 after an
    actor died). Collect now, then wait until what was free before is free again.
    """
    import gc

    gc.collect()
    deadline = time.monotonic() + RELEASE_WAIT_S
    while time.monotonic() < deadline:
        available = ray.available_resources()
        if all(available.get(name, 0.0) >= amount - 1e-6 for name, amount in free.items()):
            return
        time.sleep(0.1)
    log.info("Ray has not freed the last dataset's actors after %d s; going on", RELEASE_WAIT_S)


class RayStalledError(StoppedEarlyError):
    """The run made no progress for ``stall_timeout_s``: it is ended, what finished is saved (``summary``)."""

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary


def _stalled(summary: RunSummary, todo: int, timeout_s: float, where: str) -> RayStalledError:
    saved = summary.processed + summary.failed
    return RayStalledError(
        f"--executor ray: no progress for {timeout_s:g} s ({where}); the run was stopped. {saved} of {todo} images "
        "are saved, the rest were not run: run the same command again to continue (finished images are "
        "skipped). If a batch or the model's loading can take longer, raise --ray-stall-timeout (0 turns the "
        "watchdog off).", summary)


class _NoTracebacks(logging.Filter):
    """Ray Data logs a worker's error with its whole traceback; the run raises it as one sentence instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("ray.data"):
            return True
        return record.levelno < logging.ERROR and "Progress bars disabled" not in record.getMessage()


class _NoExceptionObjects(logging.Filter):
    """Keep Ray Data's error records, but as text: a record that holds the exception keeps its traceback's
    frames alive, and with them the handles of a dead actor's pool, whose live actors then never give
    back their CPUs and GPUs to the next dataset (seen here: any handler that keeps records, such as a
    test's log capture, did it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return True


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data at warnings only on the console (its session log keeps everything), without exception objects."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.WARNING)
    consoles = [handler for name in ("ray.data", "ray") for handler in logging.getLogger(name).handlers
                if getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)]
    quiet = _NoTracebacks()
    for handler in consoles:
        handler.addFilter(quiet)
    as_text = _NoExceptionObjects()
    loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
               if name == "ray.data" or name.startswith("ray.data.")]  # logger filters do not apply to children
    for each in loggers:
        each.addFilter(as_text)
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler in consoles:
            handler.removeFilter(quiet)
        for each in loggers:
            each.removeFilter(as_text)


class _Session:
    """The Ray instance this process started: its session folder (logs, sockets, spilled objects) under
    Ray's temp folder (/tmp/ray) is removed at shutdown, unless a run had a Ray-side failure (its logs
    are kept and named then). A cluster this process joined is left alone."""

    folder: Path | None = None
    keep: bool = False


def _note_session(ray: Any, context: Any) -> None:
    """Remember the session folder when this process started the Ray instance (its head node runs here)."""
    node = getattr(ray._private.worker, "_global_node", None)
    folder = (getattr(context, "address_info", None) or {}).get("session_dir")
    if folder and node is not None and getattr(node, "head", False):
        _Session.folder, _Session.keep = Path(folder), False


class _TokenAuthNotice(logging.Filter):
    """Ray's notice that it turned token authentication on for the instance it starts (its default)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


@contextlib.contextmanager
def _no_token_auth_notice() -> Iterator[None]:
    """Leave out Ray's notice that token authentication is on while Ray starts (the default, secure: nothing to
    act on; it landed amid the progress bar of every ``--executor ray`` run). Its warning that authentication
    is off is kept."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = _TokenAuthNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _is_stall(error: BaseException) -> bool:
    """Ray Data's no-progress guard ended the dataset (``ExecutionTimeoutError``, Ray 2.60 and newer)."""
    try:
        from ray.data.exceptions import ExecutionTimeoutError
    except ImportError:
        return False
    return isinstance(error, ExecutionTimeoutError)


def _keep_logs() -> None:
    _Session.keep = True


def _logs_hint() -> str:
    if _Session.folder is not None:
        return f"Ray's logs of this run: {_Session.folder / 'logs'}"
    return "the Ray cluster's logs: session_latest/logs under its temp folder (/tmp/ray by default)"


def _shutdown(ray: Any) -> None:
    """``ray.shutdown()``, then remove the session folder of an instance this process started (or name it)."""
    ray.shutdown()
    folder, keep = _Session.folder, _Session.keep
    _Session.folder, _Session.keep = None, False
    if folder is None:
        return
    if keep:
        log.warning("Ray's logs of this run are kept in %s (delete the folder when done)", folder / "logs")
        return
    deadline = time.monotonic() + 5
    while folder.exists() and time.monotonic() < deadline:  # Ray's processes may write a last line as they end
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.1)
    latest = folder.parent / "session_latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() and Path(os.readlink(latest)).name == folder.name:
            latest.unlink()


def worker_error(error: BaseException) -> CaptionkitError:
    """A Ray error (an actor that could not start, a failed task) as the one sentence that caused it."""
    text = getattr(error, "error_msg", None) or str(error)
    causes = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", text, flags=re.MULTILINE)
    causes = [cause for cause in causes if not cause[0].startswith("ray.")] or causes
    if not causes:
        return CaptionkitError(f"a Ray worker failed: {text.strip().splitlines()[0] if text.strip() else error!r}")
    name, message = causes[-1]
    if name.startswith("captionkit."):
        return CaptionkitError(f"{message} (on a Ray worker)")
    return CaptionkitError(f"a Ray worker failed: {name.rsplit('.', 1)[-1]}: {message} (the traceback is in "
                           f"{_logs_hint()})")


@contextlib.contextmanager
def ray_session(address: str | None = None, **init_options: Any) -> Iterator[None]:
    """Connect once for several runs (a pipeline's steps); shut down at the end only what was started here."""
    executor = RayExecutor(address=address, init_options=init_options)
    with contextlib.redirect_stdout(sys.stderr):  # Ray prints worker errors on stdout: keep it for --progress json
        executor._ray()
        try:
            yield
        except BaseException:
            _keep_logs()
            raise
        finally:
            if executor._started_ray:
                import ray

                _shutdown(ray)


class RayExecutor(LocalExecutor):
    """Runs one step over records on a Ray cluster; the driver (this process) is the only writer.

    ``address``: ``None`` starts a local Ray instance unless one runs in this process (or
    ``RAY_ADDRESS`` names one), ``auto`` joins the cluster this machine belongs to, ``ray://host:10001``
    a remote one. ``num_actors`` model replicas (default: one per GPU, or one without GPUs), each with
    ``gpus_per_actor`` GPUs (default 1 when the cluster has GPUs) and ``cpus_per_actor`` CPUs;
    ``decode_cpus`` CPUs per decode task; ``batch_retries``: how often an image whose worker died is
    run again on its own; ``stall_timeout_s``: a run in which nothing moves for this long (a hung
    model, actors that cannot be placed) is ended with :class:`RayStalledError` (0: never).
    """

    def __init__(self, options: RunOptions | None = None, progress: Progress | None = None, *,
                 address: str | None = None, num_actors: int | None = None, gpus_per_actor: float | None = None,
                 cpus_per_actor: float = 1.0, decode_cpus: float = 1.0, decode_tasks: int | None = None,
                 batch_retries: int = 2, stall_timeout_s: float = STALL_TIMEOUT_S,
                 init_options: dict[str, Any] | None = None) -> None:
        super().__init__(options, progress)
        if num_actors is not None and num_actors < 1:
            raise CaptionkitError("--ray-actors must be at least 1.")
        if (gpus_per_actor or 0) < 0 or cpus_per_actor <= 0 or decode_cpus <= 0:
            raise CaptionkitError("--ray-gpus-per-actor must be 0 or more, CPUs per actor and per decode task "
                                  "more than 0.")
        if stall_timeout_s < 0:
            raise CaptionkitError("--ray-stall-timeout must be 0 (no watchdog) or more seconds.")
        self.address = address
        self.num_actors = num_actors
        self.gpus_per_actor = gpus_per_actor
        self.cpus_per_actor = cpus_per_actor
        self.decode_cpus = decode_cpus
        self.decode_tasks = decode_tasks
        self.batch_retries = batch_retries
        self.stall_timeout_s = stall_timeout_s
        self.init_options = dict(init_options or {})
        self._started_ray = False
        self._todo = 0
        self.actor_busy: dict[int, float] = {}  # model seconds per actor (by pid) in the last run

    # connection ---------------------------------------------------------------
    def _ray(self):
        ray = require_ray()
        if not ray.is_initialized():
            options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
                       **self.init_options}
            try:
                with _no_token_auth_notice():
                    context = ray.init(address=self.address, **options)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise CaptionkitError(f"--ray-address {self.address or '(local)'}: cannot start or reach Ray "
                                      f"({error}). Start a cluster with `ray start --head` or `ray up`, or "
                                      "leave --ray-address out to start one on this machine.") from error
            self._started_ray = True
            _note_session(ray, context)
            log.info("ray: %s", ray.cluster_resources())
        return ray

    def run(self, step: Step, records: list[Record], store: Store, sink: SidecarSink | None) -> RunSummary:
        # Ray prints what its workers report ("(raylet) ... actor died") on stdout, which belongs to
        # --progress json; the progress stream keeps the real stdout it was given.
        from captionkit.core.webdataset import LocalShardWriter, ShardSink

        shards = isinstance(sink, ShardSink)
        with contextlib.redirect_stdout(sys.stderr):
            try:
                if shards:  # output shards written by Ray tasks, which read the input shards themselves
                    sink.writer = RayShardWriter(self._ray(), locations.default_storage_options())
                summary = super().run(step, records, store, sink)
                if shards:
                    summary.files_written += sink.flush()  # while Ray is up: the shards whose last samples failed
                return summary
            finally:
                if shards:
                    sink.writer = LocalShardWriter()
                self._stop_ray()

    def _stop_ray(self) -> None:
        """Shut down the Ray instance this executor started (one it joined stays up)."""
        if self._started_ray:
            import ray

            _shutdown(ray)
            self._started_ray = False

    def list_records(self, source: Source) -> list[Record]:
        """Folders listed by Ray tasks in parallel, manifests read by Ray Data (the same records, in order)."""
        from captionkit.executors.ray_sources import list_records

        try:
            with contextlib.redirect_stdout(sys.stderr), _quiet_ray_data():
                records, signatures = list_records(source, self._ray())
        except BaseException:
            self._stop_ray()  # no run follows to shut it down
            raise
        if not records:
            self._stop_ray()
        self.known_signatures.update(signatures)
        return records

    def _gpus(self) -> float:
        if self.gpus_per_actor is None:
            self.gpus_per_actor = 1.0 if self._ray().cluster_resources().get("GPU", 0) > 0 else 0.0
        return self.gpus_per_actor

    def _device(self) -> str:
        return "cuda" if self._gpus() > 0 else "cpu"  # Ray gives each actor its GPUs as cuda:0..

    # planning -----------------------------------------------------------------
    def worker_settings(self, step: Step) -> dict[str, Any] | None:
        """The fingerprint as an actor computes it (``dtype auto`` resolves on the actor's device)."""
        if not runs_on_device(step):
            return None
        if self.gpus_per_actor == 0:
            return on_device(step, "cpu", _dumps).fingerprint()
        try:
            return on_device(step, self._device(), _dumps).fingerprint()
        except CaptionkitError:  # this driver has no GPU: ask a worker that has one
            return self._probe(step, with_meta=False)[0]

    def _probe(self, step: Step, with_meta: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        ray = self._ray()
        task = ray.remote(num_cpus=self.cpus_per_actor, num_gpus=self._gpus(), max_retries=self.batch_retries)(probe)
        return ray.get(task.remote(portable(step, _dumps), self._device(), with_meta))

    # running ------------------------------------------------------------------
    def _execute(self, step: Step, todo: list[Record], store: Store, sink: SidecarSink | None,
                 summary: RunSummary, settings: dict, step_fingerprint: str,
                 signatures: dict[str, str | None]) -> None:
        ray = self._ray()
        from ray.data import DataContext

        if hasattr(step, "shared_meta"):  # e.g. a tagger's vocabulary, which rendering reads from the store
            started = time.perf_counter()
            for key, value in self._probe(step, with_meta=True)[1].items():
                store.put_meta(key, value)
            summary.model_load_s = time.perf_counter() - started
        gpus = self._gpus()
        actors = self.num_actors or (max(1, int(ray.cluster_resources().get("GPU", 0) // gpus)) if gpus else 1)
        batch = max(1, step.batch_size)
        actors = min(actors, -(-len(todo) // batch))  # no replica loads a model it has no batch for (a resume's rest)
        # Blocks of 1-8 batches, at least 4 per replica when there are enough images: each block costs the
        # scheduler ~10-20 ms (measured here), and a killed driver or actor loses at most the blocks in flight.
        per_block = batch * min(8, max(1, len(todo) // (batch * 4 * (actors + 1))))
        context = DataContext.get_current()
        # max_errored_blocks: a batch that fails every retry is recorded as failed, not a job failure;
        # an actor killed while loading the model is replaced (INIT_DEATHS in a row end the run);
        # Ray Data's no-progress guard is the stall watchdog (-1: off).
        wanted = {"max_errored_blocks": -1, "enable_progress_bars": False, "print_on_execution_start": False,
                  "enable_auto_log_stats": False, "max_consecutive_actor_init_deaths": INIT_DEATHS,
                  "execution_no_progress_timeout_s": self.stall_timeout_s or -1}
        saved = {name: getattr(context, name) for name in wanted if hasattr(context, name)}
        for name in saved:
            setattr(context, name, wanted[name])
        if self.stall_timeout_s and "execution_no_progress_timeout_s" not in saved:
            log.warning("This Ray (%s) has no no-progress guard for datasets: --ray-stall-timeout watches only "
                        "the rerun of lost images. Ray 2.60 or newer has it.", ray.__version__)
        self._todo = len(todo)
        self.actor_busy = {}
        self.progress.start(len(todo), step.field)
        started = time.perf_counter()
        free = {name: ray.available_resources().get(name, 0.0) for name in ("CPU", "GPU")}
        delivered: set[str] = set()
        seen_actors: dict[int, float] = {}
        stalled = False
        try:
            commit = (store, sink, summary, settings, step_fingerprint, signatures, delivered, seen_actors)
            self._pass(ray, step, todo, actors, gpus, batch, per_block, commit)
            lost = [record for record in todo if record.id not in delivered]
            if lost and not summary.interrupted:
                # A block whose actor died (killed, preempted, or an image that crashes it) was lost with
                # all its images: run them again, halving on a crash, so only an image that causes it is lost.
                log.warning("%d images were lost with a failing batch; running them again", len(lost))
                _release(ray, free)  # the retry actor needs what the pass held
                self._isolate(ray, step, lost, gpus, commit)
                lost = [record for record in lost if record.id not in delivered]
            if lost and not summary.interrupted:
                _keep_logs()  # the deaths are in Ray's logs
                message = LOST.format(retries=self.batch_retries)
                log.warning("%d images %s", len(lost), message)
                items = [Prepared(record, None, (0, 0), "") for record in lost]
                self._save(step, items, [(False, message)] * len(items), [], store, sink, summary, settings,
                           step_fingerprint, signatures)
        except RayStalledError:
            stalled = True  # its hung actors were killed (_end_actors): nothing to wait for
            raise
        finally:
            for name, value in saved.items():
                setattr(context, name, value)
            self.progress.close()
            if not stalled:
                _release(ray, free)  # the next step's dataset needs them
        actor_load = max(seen_actors.values(), default=0.0)  # the actors start in parallel
        summary.model_load_s += actor_load  # (+ the tagger's vocabulary probe, before ``started``)
        summary.processing_s = max(0.0, time.perf_counter() - started - actor_load)
        if seen_actors:  # per actor, so the busy fraction reads as one GPU's (a restarted actor is a new pid)
            summary.model_busy_s /= min(len(seen_actors), actors)
        if self.actor_busy and summary.processing_s > 0:
            log.info("model busy per actor (model seconds / run seconds): %s", ", ".join(
                f"{pid} {busy / summary.processing_s:.2f}" for pid, busy in self.actor_busy.items()))

    def _isolate(self, ray: Any, step: Step, records: list[Record], gpus: float, commit: tuple) -> None:
        """Run records whose block was lost again on one model actor of the driver's own, halving on a crash.

        Each lost batch already died with its actor twice in the pool, so it starts here as two halves (a
        third run of the whole batch would most likely cost one more restart, which reloads the model). A
        group that kills the actor is split in two and each half tried again, down to single images, which
        get ``batch_retries`` tries, the later ones after everything else: an image that crashes its
        worker loses only itself, and the driver does not wait for a restart that nothing is left to use.
        The actor is killed here when it is done.
        """
        summary = commit[2]
        device = self._device() if runs_on_device(step) else None
        actor_class = ray.remote(num_cpus=self.cpus_per_actor, num_gpus=gpus or None, max_restarts=-1,
                                 max_task_retries=0)(ModelActor)
        ledger = _open_pass(ray)
        actor = actor_class.remote(portable(step, _dumps), device, False, max(1, int(self.cpus_per_actor)), ledger)
        batch = max(1, step.batch_size)
        groups = [(half, 1) for start in range(0, len(records), batch)
                  for half in _halves(records[start:start + batch])]
        try:
            if not _back(ray, actor):
                log.warning("no room on the cluster for a model actor within %d s; the lost images are tried "
                            "again on the next run", ISOLATION_WAIT_S)
                return
            with _StopFlag(self.options.stop) as stop:
                while groups and not stop.requested:
                    group, attempt = groups.pop(0)
                    try:
                        table = ray.get(actor.run.remote(_records_table(group)), timeout=self.stall_timeout_s or None)
                    except ray.exceptions.GetTimeoutError:
                        _keep_logs()
                        raise _stalled(summary, self._todo, self.stall_timeout_s,
                                       "a model actor rerunning lost images did not answer") from None
                    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                        # the actor died on this group: split it (a single image: try it again last)
                        if len(group) > 1:
                            groups[:0] = [(half, 1) for half in _halves(group)]
                        elif attempt < self.batch_retries:
                            groups.append((group, attempt + 1))
                        # wait until it is back (restarted, model loaded) when something is left to run
                        if groups and not _back(ray, actor):
                            log.warning("the model actor did not come back within %d s; the lost images are tried "
                                        "again on the next run", ISOLATION_WAIT_S)
                            return
                        continue
                    self._commit(step, table, *commit)
                summary.interrupted = stop.requested
        except ray.exceptions.RayError as error:
            _keep_logs()
            raise worker_error(error) from error
        finally:
            ray.kill(actor)
            _end_actors(ray, ledger)

    def _pass(self, ray: Any, step: Step, records: list[Record], actors: int, gpus: float, batch: int,
              per_block: int, commit: tuple) -> None:
        """One Ray Data run over ``records``: CPU stage, model stage, each block committed as it arrives."""
        summary = commit[2]
        blob = portable(step, _dumps)  # after classify: the per-image prompts it filled travel with it
        apart = bool(getattr(step, "prepares_apart", False))
        # Block by block into the object store (spillable), so the driver never holds a second copy of the list.
        dataset = ray.data.from_arrow_refs([
            ray.put(_records_table(records[start:start + per_block])) for start in range(0, len(records), per_block)])
        remote = RemoteAccess(locations.default_storage_options(), self.options.io_workers) \
            if any(record.url is not None or _in_remote_shard(record) for record in records) else None
        if apart:
            dataset = dataset.map_batches(
                decode_batch, fn_args=(blob, max(1, int(self.decode_cpus)), remote), batch_size=batch,
                batch_format="pyarrow", num_cpus=self.decode_cpus,
                compute=ray.data.TaskPoolStrategy(size=self.decode_tasks) if self.decode_tasks else None,
            )
        ledger = _open_pass(ray)
        model_stage = {
            "fn_constructor_args": (blob, self._device() if runs_on_device(step) else None, apart,
                                    max(1, int(self.cpus_per_actor)), ledger, remote),
            "batch_size": batch, "batch_format": "pyarrow",
            # no more blocks queued on an actor than it runs at once: a killed actor loses only those
            "compute": ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=MODEL_STAGE_CONCURRENCY),
            "num_cpus": self.cpus_per_actor, "num_gpus": gpus or None, "max_concurrency": MODEL_STAGE_CONCURRENCY,
        }
        try:
            # A dead actor is restarted in place (it reloads the model) and the blocks it held run once more
            # in the pool; a block whose actor dies again goes to _isolate. Never max_restarts=0: Ray 2.60's
            # pool keeps counting a dead actor and never replaces it, so a one-actor pool waited forever.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Ray deprecates these keywords without a named successor
                dataset = dataset.map_batches(ModelActor, **model_stage, max_restarts=-1,
                                              max_task_retries=POOL_TASK_RETRIES)
        except TypeError:  # a Ray without them: its own default (restart the actor, retry the batch)
            dataset = dataset.map_batches(ModelActor, **model_stage)
        with _StopFlag(self.options.stop) as stop, _quiet_ray_data():
            blocks = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
            try:
                for table in blocks:
                    self._commit(step, table, *commit)
                    if stop.requested:
                        break
            except ray.exceptions.RayActorError as error:  # the init-death budget is spent
                _keep_logs()
                raise CaptionkitError(
                    f"--executor ray: the model actors died {INIT_DEATHS + 1} times in a row while loading the model "
                    "(killed, out of host or GPU memory, or a crash in native code); nothing was run. "
                    f"{_logs_hint()}") from error
            except ray.exceptions.RayError as error:
                _keep_logs()
                raise worker_error(error) from error
            except Exception as error:
                if _is_stall(error):
                    _keep_logs()
                    raise _stalled(summary, len(records), self.stall_timeout_s,
                                   "no block moved through the model stage") from None
                raise
            finally:
                if hasattr(blocks, "close"):
                    blocks.close()  # stop the pipeline now (a stop request), not when garbage collected
                _end_actors(ray, ledger)
            summary.interrupted = stop.requested

    def _commit(self, step: Step, table, store: Store, sink: SidecarSink | None, summary: RunSummary,
                settings: dict, step_fingerprint: str, signatures: dict[str, str | None], delivered: set[str],
                seen_actors: dict[int, float]) -> None:
        """One block from the model stage → the store and sidecars, through the local executor's save."""
        items: list[Prepared] = []
        outcomes: list[tuple[bool, Any]] = []
        bad: list[tuple[Record, str]] = []
        for blob, stats in zip(table.column("blob").to_pylist(), table.column("stats").to_pylist(), strict=True):
            entry = pickle.loads(blob)
            if stats:
                numbers = pickle.loads(stats)
                summary.model_busy_s += numbers["busy_s"]
                self.actor_busy[numbers["actor"]] = self.actor_busy.get(numbers["actor"], 0.0) + numbers["busy_s"]
                seen_actors[numbers["actor"]] = max(seen_actors.get(numbers["actor"], 0.0), numbers["load_s"])
                summary.batch_size_final = min(summary.batch_size_final or numbers["batch_size"],
                                               numbers["batch_size"])
            if entry[0] == "fatal":  # the model cannot load on the workers
                _keep_logs()
                raise CaptionkitError(entry[1])
            if entry[0] == "done":
                _, item, ok, value = entry
                if item.record.id in delivered:
                    continue  # never twice, whatever a retry sends
                delivered.add(item.record.id)
                items.append(item)
                outcomes.append((ok, value))
            else:
                _, record, message = entry
                if record.id in delivered:
                    continue
                delivered.add(record.id)
                bad.append((record, message))
        if items or bad:
            self._save(step, items, outcomes, bad, store, sink, summary, settings, step_fingerprint, signatures)
