"""`--executor ray` on a local Ray instance (2 CPUs, one per test process): parity, a killed actor, a killed driver."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as parquet
import pytest

import captionkit
from captionkit.core.errors import CaptionkitError
from captionkit.core.sinks import export_parquet_shards
from captionkit.core.store import Store
from tests.images import write_good_images
from tests.leftovers import end, survivors
from tests.pixel_digest import RUN_LIMIT_S, HangsOn, PixelDigest, send_by_value
from tests.run_state import committed as committed_results
from tests.run_state import copy_of, state, wait_while_running
from tests.test_tag_pipeline import tagger_folder  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow  # left out of the quick subset (-m 'not slow')

IMAGES = 24
FAST = {"max_new_tokens": 12, "num_beams": 1, "progress": "quiet", "workers": 2}
RAY = {"executor": "ray", "ray_actors": 2, "ray_cpus_per_actor": 0.5}  # 2 replicas + a decode task on 2 CPUs


@pytest.fixture(scope="module")
def ray_address(shared_ray):
    """The test process's Ray (tests/conftest.py), with this module's test classes sent to actors by value."""
    send_by_value(__name__)
    return shared_ray


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_florence):
    """Images, a broken file, and the local executor's results on them (the reference)."""
    source = tmp_path_factory.mktemp("ray-corpus") / "images"
    write_good_images(source, IMAGES)
    (source / "broken.png").write_bytes(b"")
    local = source.parent / "local"
    shutil.copytree(source, local)
    summary = captionkit.caption(local, model=str(tiny_florence), batch_size=4, **FAST)
    assert (summary.processed, summary.failed) == (IMAGES, 1)
    return source, local, summary


def test_same_results_as_the_local_executor(tmp_path, corpus, tiny_florence, ray_address):
    """Florence-2 on one model actor (each costs a process that imports torch and transformers, ~7 s of CPU): a
    pool of two, blocks committed from both, is test_a_killed_actor_still_saves_every_image_exactly_once."""
    source, local, reference = corpus
    folder = copy_of(source, tmp_path / "images")
    summary = captionkit.caption(folder, model=str(tiny_florence), batch_size=4, **FAST, **{**RAY, "ray_actors": 1})
    assert (summary.processed, summary.failed, summary.files_written) == (IMAGES, 1, IMAGES)
    assert "broken.png" in summary.errors and summary.interrupted is False
    got, expected = state(folder), state(local)
    assert got == expected and len(got["sidecars"]) == IMAGES
    assert len({text for _, text, *_ in got["rows"].values()}) > 1  # the tiny model says different things
    again = captionkit.caption(folder, model=str(tiny_florence), batch_size=4, **FAST, **{**RAY, "ray_actors": 1})
    assert (again.processed, again.reused, again.failed_earlier) == (0, IMAGES, 1)  # the store's fingerprints
    with Store(folder) as store:  # sharded Parquet for very large runs: every row once, in id order
        assert export_parquet_shards(store, tmp_path / "shards", ["caption"], rows_per_shard=10) == IMAGES + 1
    assert sorted(path.name for path in (tmp_path / "shards").iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    table = parquet.read_table(tmp_path / "shards").to_pylist()
    assert [row["id"] for row in table] == sorted(got["rows"])
    assert {row["id"]: row["caption"] for row in table if row["caption_status"] == "ok"} == {
        record_id: row[1] for record_id, row in got["rows"].items() if row[0] == "ok"}


def test_tags_match_the_local_executor(tmp_path, tagger_folder, ray_address):  # noqa: F811
    """A tagger prepares inside its actors; its vocabulary reaches the store through the driver."""
    options = captionkit.api.tag_options(general_threshold=0.4, character_threshold=0.4, include_rating=True)
    write_good_images(tmp_path / "local", 10)
    copy_of(tmp_path / "local", tmp_path / "ray")
    local = captionkit.tag(tmp_path / "local", model=str(tagger_folder), options=options, batch_size=3, device="cpu")
    remote = captionkit.tag(tmp_path / "ray", model=str(tagger_folder), options=options, batch_size=3, device="cpu",
                            executor="ray", ray_actors=1)
    assert local.processed == remote.processed == 10
    assert state(tmp_path / "ray", "tags") == state(tmp_path / "local", "tags")
    with Store(tmp_path / "ray") as store:  # the vocabulary a re-render needs, committed by the driver
        assert any(key.startswith("vocabulary:") for key, in store._connection.execute("SELECT key FROM meta"))


def test_a_pipeline_runs_its_model_steps_on_ray(tmp_path, corpus, tiny_florence, ray_address):
    import yaml

    from captionkit.pipeline import run_pipeline

    source, local, _ = corpus
    config = {"input": str(copy_of(source, tmp_path / "images")), "base_folder": str(tmp_path / "work"),
              "save_folder": str(tmp_path / "out"),
              "steps": [{"type": "captioner", "name": "florence",
                         "config": {"model": str(tiny_florence), "max_new_tokens": 12, "num_beams": 1,
                                    "batch_size": 4}},
                        {"type": "template", "name": "final", "config": {"template": "photo: {florence}"}}]}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    report = run_pipeline(tmp_path / "pipeline.yaml", executor="ray", ray_actors=1)
    assert [(step.processed, step.failed) for step in report.steps] == [(IMAGES, 1), (IMAGES, 1)]
    rows = [json.loads(line) for line in report.table.read_text().splitlines()]
    expected = state(local)["sidecars"]
    # a random model's caption may clean up to "" (U+FFFD of split bytes): it still has its file
    captions = {Path(row["image"]).stem + ".txt": row["florence"] for row in rows if row["florence"] is not None}
    assert captions == expected
    assert all(row["final"] == f"photo: {row['florence']}" for row in rows if row["florence"])


def _driver_reruns(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "lost with a failing batch" in record.getMessage()]


def test_a_killed_actor_still_saves_every_image_exactly_once(tmp_path, corpus, digests, ray_address, caplog):
    caplog.set_level(logging.WARNING, logger="captionkit")
    source, _, _ = corpus
    local = digests
    folder = copy_of(source, tmp_path / "images")
    marker = tmp_path / "killed"
    captioner = ExitsOnce(marker)
    events = []
    summary = captionkit.caption(folder, captioner=captioner, batch_size=4, listener=events.append,
                                 progress="quiet", workers=2, **RAY)
    assert marker.exists()  # an actor really died mid-batch
    assert (summary.processed, summary.failed) == (IMAGES, 1)
    progress = [event for event in events if event["event"] == "progress"]
    assert progress[-1]["done"] == IMAGES  # counted once each
    assert state(folder) == state(local)  # every image once, same text, no partial or temporary file
    assert not _driver_reruns(caplog)  # its blocks ran again in the pool (restarted actor or the other one)


class ExitsOnce(PixelDigest):
    """The worker process ends (as if killed) in its second batch, once per marker file."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker, self.calls = str(marker), 0

    def caption_batch(self, requests) -> list[str]:
        self.calls += 1
        if self.calls == 2 and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return super().caption_batch(requests)


@pytest.fixture(scope="module")
def digests(tmp_path_factory, corpus) -> Path:
    """The corpus captioned by :class:`PixelDigest` with the local executor (the reference)."""
    folder = copy_of(corpus[0], tmp_path_factory.mktemp("digests") / "images")
    summary = captionkit.caption(folder, captioner=PixelDigest(), batch_size=4, progress="quiet", workers=2)
    assert (summary.processed, summary.failed) == (IMAGES, 1)
    return folder


def _ledgers(ray) -> dict[str, str]:
    """This driver's StartLedger actors in the cluster's actor table, dead ones too: actor id → state."""
    job = ray.get_runtime_context().get_job_id()
    return {actor_id: actor["State"] for actor_id, actor in ray._private.state.actors().items()
            if actor["ActorClassName"] == "StartLedger" and actor["JobID"] == job}


def test_an_image_that_crashes_its_worker_loses_only_itself(tmp_path, corpus, digests, ray_address):
    import ray

    source, _, _ = corpus
    folder = copy_of(source, tmp_path / "images")
    ledgers = _ledgers(ray)
    summary = captionkit.caption(folder, captioner=PixelDigest(poison="img005.png"), batch_size=4,
                                 progress="quiet", workers=2, **{**RAY, "ray_actors": 1})
    assert (summary.processed, summary.failed) == (IMAGES - 1, 2)  # its three batch neighbours were saved
    assert "lost on the cluster" in summary.errors["img005.png"]
    # every actor of the run is gone, the restarted ones too: nothing holds the CPUs the next dataset needs
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]
    expected = state(digests)
    got = state(folder)
    assert {key: row for key, row in got["rows"].items() if key != "img005.png"} == {
        key: row for key, row in expected["rows"].items() if key != "img005.png"}
    loads = tmp_path / "loads"
    loads.mkdir()
    again = captionkit.caption(folder, captioner=PixelDigest(loads=loads), batch_size=4, progress="quiet",
                               workers=2, **RAY)
    assert (again.processed, again.reused) == (1, IMAGES - 1)  # a lost image is tried again on the next run
    assert len(list(loads.iterdir())) == 1  # one batch left: one of the two replicas loads the model
    assert state(folder) == expected
    # the pool, the rerun of the lost images and the second run shared one ledger (a process start each before)
    started = {actor_id: alive for actor_id, alive in _ledgers(ray).items() if actor_id not in ledgers}
    assert len(started) <= 1 and list(_ledgers(ray).values()).count("ALIVE") == 1


def test_the_start_ledger_is_replaced_with_the_ray_instance_it_belongs_to(ray_address):
    """One ledger for every pass of a driver; a killed one is replaced, and so is one whose Ray instance went away
    (a process that starts its own Ray for each run, as the API does, or a second pipeline in the UI)."""
    import tempfile

    script = """if True:
        import sys
        import time

        import ray
        from captionkit.executors.ray_executor import _open_pass, ray_session

        with ray_session(sys.argv[1]):  # the test process's Ray
            first = _open_pass(ray).actor
            assert _open_pass(ray).actor._actor_id == first._actor_id  # every pass of the driver: one ledger
            ray.kill(first)
            while ray._private.state.actors(first._actor_id.hex())["State"] != "DEAD":
                time.sleep(0.05)
            assert _open_pass(ray).actor._actor_id != first._actor_id
        ray.shutdown()  # joined, so left up by ray_session
        with ray_session(num_cpus=1):  # a Ray instance of its own: the ledger of the last one cannot answer
            again = _open_pass(ray)
            assert ray.get(again.actor.close.remote(again.token)) == []
    """
    ray_temp = Path(tempfile.mkdtemp(prefix="ckray", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    try:
        run = subprocess.run([sys.executable, "-c", script, ray_address], env={**env, "RAY_TMPDIR": str(ray_temp)},
                             capture_output=True, text=True, timeout=RUN_LIMIT_S)
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


def test_a_model_actor_that_starts_after_its_pass_ended_ends_without_loading(tmp_path, ray_address):
    """An actor Ray restarts after the driver closed its pass (the run is over) ends for good, without loading."""
    import ray

    from captionkit.executors import portable
    from captionkit.executors.ray_executor import ModelActor, _dumps, _open_pass
    from captionkit.steps.captioner import CaptionStep

    loads = tmp_path / "loads"
    loads.mkdir()
    ledger = _open_pass(ray)
    ray.get(ledger.actor.close.remote(ledger.token))  # the pass is over
    blob = portable(CaptionStep(PixelDigest(loads=loads)), _dumps)
    actor = ray.remote(num_cpus=0.5, max_restarts=-1)(ModelActor).remote(blob, "cpu", False, 1, ledger)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.ready.remote(), timeout=RUN_LIMIT_S)
    assert ray._private.state.actors(actor._actor_id.hex())["NumRestarts"] == 0  # not restarted either
    assert not list(loads.iterdir())


# ------------------------------------------------------------------ processes killed by hand (SIGKILL)
def _kill_when_waiting(marker: Path) -> threading.Thread:
    """SIGKILL the process whose pid appears in ``marker`` (from another thread, as a user's ``kill -9``)."""

    def kill() -> None:
        deadline = time.monotonic() + RUN_LIMIT_S
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if marker.exists():
            os.kill(int(marker.read_text()), signal.SIGKILL)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def _ends(call, limit_s: float = RUN_LIMIT_S):
    """``call()`` on a thread: its result or error, or a failure (not a hung test) when it has not ended."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"the run hung: no end within {limit_s} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_killed_actor_of_a_one_actor_pool_is_replaced(tmp_path, corpus, digests, ray_address, caplog):
    """The default pool on a CPU machine has one model actor: SIGKILL it in the middle of the run."""
    caplog.set_level(logging.WARNING, logger="captionkit")
    source, _, _ = corpus
    local = digests
    folder = copy_of(source, tmp_path / "images")
    marker = tmp_path / "killed"
    _kill_when_waiting(marker)
    captioner = HangsOn(marker, "img012.png")
    summary = _ends(lambda: captionkit.caption(folder, captioner=captioner, batch_size=4, progress="quiet",
                                               workers=2, executor="ray"))
    assert marker.exists()  # the actor really was killed
    assert (summary.processed, summary.failed) == (IMAGES, 1)
    assert state(folder) == state(local)  # every image once, same text
    assert not _driver_reruns(caplog)  # the killed batch ran again in the pool, not on the driver's own actor


def test_an_actor_killed_while_loading_the_model_is_replaced(tmp_path, corpus, digests, ray_address):
    source, _, _ = corpus
    local = digests
    folder = copy_of(source, tmp_path / "images")
    marker = tmp_path / "killed"
    _kill_when_waiting(marker)
    captioner = HangsOn(marker, "load")
    summary = _ends(lambda: captionkit.caption(folder, captioner=captioner, batch_size=4, progress="quiet",
                                               workers=2, executor="ray"))
    assert marker.exists()
    assert (summary.processed, summary.failed) == (IMAGES, 1)
    assert state(folder) == state(local)


class KilledEveryLoad(PixelDigest):
    """Every model actor writes its pid into ``folder`` while loading and waits to be killed."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = str(folder)

    def load(self) -> None:
        Path(self.folder, f"{os.getpid()}.tmp").write_text(str(os.getpid()))
        os.replace(Path(self.folder, f"{os.getpid()}.tmp"), Path(self.folder, f"{os.getpid()}.pid"))
        time.sleep(RUN_LIMIT_S + 60)


def test_actors_killed_every_time_they_load_end_the_run_with_a_clear_error(tmp_path, corpus, ray_address):
    source, _, _ = corpus
    folder = copy_of(source, tmp_path / "images")
    pids = tmp_path / "pids"
    pids.mkdir()
    done = threading.Event()

    def kill_each() -> None:
        killed: set[str] = set()
        while not done.is_set():
            for path in pids.glob("*.pid"):
                if path.name not in killed:
                    killed.add(path.name)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(path.read_text()), signal.SIGKILL)
            time.sleep(0.05)

    threading.Thread(target=kill_each, daemon=True).start()
    captioner = KilledEveryLoad(pids)
    try:
        with pytest.raises(CaptionkitError, match="died 4 times in a row while loading the model"):
            _ends(lambda: captionkit.caption(folder, captioner=captioner, batch_size=4, progress="quiet",
                                             executor="ray"))
    finally:
        done.set()
    assert len(list(pids.glob("*.pid"))) == 4  # the first start and three restarts, each killed


def test_a_run_in_which_nothing_moves_is_ended_with_what_finished_kept(tmp_path, corpus, digests, ray_address):
    """A hung model (a stuck GPU call, say) is not killed: the stall watchdog ends the run, the store keeps the rest."""
    from captionkit.executors.ray_executor import RayStalledError

    source, _, _ = corpus
    local = digests
    folder = copy_of(source, tmp_path / "images")
    marker = tmp_path / "hung"
    captioner = HangsOn(marker, "img012.png")  # nobody kills it
    try:
        with pytest.raises(RayStalledError, match=r"no progress for 8 s .*--ray-stall-timeout") as stalled:
            _ends(lambda: captionkit.caption(folder, captioner=captioner, batch_size=4, progress="quiet",
                                             workers=2, executor="ray", ray_stall_timeout=8))
    finally:
        if marker.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(marker.read_text()), signal.SIGKILL)  # the hung actor, which holds a CPU
    summary = stalled.value.summary
    # at least the first batch (broken.png sorts first: 3 captions and its failure) was saved before the model hung
    assert 4 <= summary.processed + summary.failed and summary.processed < IMAGES
    saved = state(folder)["rows"]
    assert len(saved) == summary.processed + summary.failed
    assert saved == {key: row for key, row in state(local)["rows"].items() if key in saved}


class CannotLoad(PixelDigest):
    """Loading fails on every worker (a missing package there, say), counted in ``folder``."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = str(folder)

    def load(self) -> None:
        Path(self.folder, f"{os.getpid()}-{time.monotonic_ns()}").touch()
        raise ImportError("No module named 'flash_attn'")


def test_a_model_that_cannot_load_on_the_workers_stops_the_run_at_once(tmp_path, corpus, ray_address):
    source, _, _ = corpus
    folder = copy_of(source, tmp_path / "images")
    tries = tmp_path / "tries"
    tries.mkdir()
    captioner = CannotLoad(tries)
    with pytest.raises(CaptionkitError, match="could not load the model: ImportError: No module named 'flash_attn'"):
        _ends(lambda: captionkit.caption(folder, captioner=captioner, batch_size=4, progress="quiet",
                                         executor="ray"))
    assert len(list(tries.iterdir())) == 1  # not retried: the same error each time
    with Store(folder) as store:
        assert not store.get_many("caption", ["img000.png"])  # no image recorded as failed for it


class HangsAtExit(PixelDigest):
    """Its worker process gets a C exit handler that never returns, as Ray 2.60's own sometimes does (a deadlock in
    ``~CoreWorkerProcessImpl``, seen here with gdb: a Florence-2 actor alive, 600 MB resident, 15 minutes after its
    pool ended). Each process that loads it leaves its pid in ``folder``."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = str(folder)

    def load(self) -> None:
        import ctypes

        libc = ctypes.CDLL(None)
        register = getattr(libc, "__cxa_atexit")  # noqa: B009 - a plain attribute is name-mangled in a class
        register(ctypes.cast(libc.pause, ctypes.c_void_p), None, None)  # pause(): until a signal comes
        Path(self.folder, str(os.getpid())).touch()


def test_a_model_actor_process_ends_when_its_pool_does_even_if_an_exit_handler_hangs(tmp_path, corpus, digests,
                                                                                      ray_address):
    """A model actor whose pool ended leaves before the C exit handlers run: one that hangs there (Ray's own, now
    and then) would otherwise keep the process, and the loaded model's memory (a GPU's on a cluster), for good,
    while Ray counts its CPUs and GPUs free again."""
    source, _, _ = corpus
    folder = copy_of(source, tmp_path / "images")
    pids = tmp_path / "pids"
    pids.mkdir()
    summary = _ends(lambda: captionkit.caption(folder, captioner=HangsAtExit(pids), batch_size=4, progress="quiet",
                                               workers=2, executor="ray", ray_actors=1))
    assert (summary.processed, summary.failed) == (IMAGES, 1) and state(folder) == state(digests)
    started = [int(path.name) for path in pids.iterdir()]
    assert started
    left = survivors(started, grace_s=30)
    end(left)
    assert not left, "the actor process outlived its pool"


def test_a_driver_keeps_its_own_exit(ray_address):
    """Leaving at once is for actor processes: a driver (this test process) still runs its exit handlers."""
    from captionkit.executors.ray_executor import _leave_before_exit_handlers

    before = sys.exit
    _leave_before_exit_handlers()
    assert sys.exit is before


def test_a_chat_model_prepares_on_the_cpu_stage_with_the_local_results(tmp_path, ray_address):
    from captionkit.testing.vlms.llava import build_llava

    model = build_llava(tmp_path / "llava")
    write_good_images(tmp_path / "local", 6)
    copy_of(tmp_path / "local", tmp_path / "ray")
    options = {"model": str(model), "prompt": "Describe it.", "max_new_tokens": 8, "batch_size": 2,
               "progress": "quiet", "max_image_side": 48}
    local = captionkit.caption(tmp_path / "local", **options)
    remote = captionkit.caption(tmp_path / "ray", **options, executor="ray", ray_actors=1)
    assert local.processed == remote.processed == 6
    assert state(tmp_path / "ray") == state(tmp_path / "local")


def test_resume_after_the_driver_is_killed(tmp_path, corpus, digests, ray_address):
    """A driver (a process of its own, a job of its own on the cluster) is killed with a block in flight; the next
    run skips what the store has and ends as a clean run would."""
    source, _, _ = corpus
    folder = copy_of(source, tmp_path / "images")
    marker = tmp_path / "hung"
    script = """if True:
        import sys

        sys.path.insert(0, sys.argv[1])
        import captionkit
        from tests.pixel_digest import HangsInBatch, send_by_value

        send_by_value()
        captionkit.caption(sys.argv[2], captioner=HangsInBatch(sys.argv[3], 5), batch_size=4, progress="quiet",
                           workers=2, executor="ray", ray_address=sys.argv[4], ray_actors=1)
    """
    root = Path(__file__).resolve().parents[1]
    driver = subprocess.Popen([sys.executable, "-c", script, str(root), str(folder), str(marker), ray_address],
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:  # the model hangs in its fifth batch (a block of its own); blocks before it are committed, all but the
        # last one or two, which Ray Data may still hold: they are lost with the driver, and run again below
        wait_while_running(driver, lambda: marker.exists() and committed_results(folder) >= 4)
    finally:
        driver.send_signal(signal.SIGKILL)  # its job ends: Ray ends its actors, the hung one too
        driver.wait()
    committed = committed_results(folder)
    assert 4 <= committed < IMAGES
    rerun = captionkit.caption(folder, captioner=PixelDigest(), batch_size=4, progress="quiet", workers=2,
                               executor="ray", ray_actors=1)
    assert (rerun.reused, rerun.processed, rerun.failed) == (committed, IMAGES - committed, 1)  # finished ones skipped
    assert state(folder) == state(digests)  # as a clean run: every image once, no partial or temporary file


def test_a_ray_instance_the_cli_starts_leaves_no_session_folder(tmp_path, tiny_florence):
    """Ray writes a session folder (logs, sockets) per instance under its temp folder; captionkit removes its own.
    Ray's warning that it turned token authentication on is not printed amid the progress."""
    import tempfile

    write_good_images(tmp_path / "images", 4)
    ray_temp = Path(tempfile.mkdtemp(prefix="ckray", dir="/tmp"))  # short: Ray's socket paths must fit
    # as on a new machine: the shared instance of this process left RAY_AUTH_MODE set, and Ray is silent then
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(HF_HUB_OFFLINE="1", RAY_TMPDIR=str(ray_temp))
    try:
        run = subprocess.run([sys.executable, "-m", "captionkit.cli", "caption", str(tmp_path / "images"), "--model",
                              str(tiny_florence), "--num-beams", "1", "--max-new-tokens", "8", "--executor", "ray",
                              "-q"], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "Token authentication" not in run.stderr, run.stderr
        assert len(list((tmp_path / "images").glob("*.txt"))) == 4
        ray_root = ray_temp / "ray" if (ray_temp / "ray").is_dir() else ray_temp
        assert not [path.name for path in ray_root.iterdir() if path.name.startswith("session")]
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


def test_the_driver_fingerprints_a_model_for_cpu_workers_without_importing_torch(tiny_florence):
    """The driver computes the fingerprint the workers will see (``worker_settings``) but never runs the model: on
    CPU workers it does not import torch for it (~2 s of a CLI run's start), and the label is torch's."""
    script = """if True:
        import sys

        from captionkit.executors import on_device
        from captionkit.executors.ray_executor import _dumps
        from captionkit.steps.captioner import CaptionStep
        from captionkit.models.florence2 import Florence2Captioner

        for dtype, label in (("auto", "float32"), ("fp16", "float16"), ("bfloat16", "bfloat16")):
            step = CaptionStep(Florence2Captioner(model=sys.argv[1], dtype=dtype))
            assert on_device(step, "cpu", _dumps).fingerprint()["dtype"] == label
        assert "torch" not in sys.modules, "torch was imported"
    """
    run = subprocess.run([sys.executable, "-c", script, str(tiny_florence)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


def test_without_ray_the_error_says_how_to_install_it(tmp_path, tiny_florence, monkeypatch):
    write_good_images(tmp_path, 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(CaptionkitError, match=r"pip install 'captionkit\[ray\]'"):
        captionkit.caption(tmp_path, model=str(tiny_florence), executor="ray", **FAST)
    assert not (tmp_path / ".captionkit").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------ reading on Ray
def _tree(root: Path) -> Path:
    """Nested folders (deeper than the driver splits), hidden and non-image files, a loop and an alias."""
    write_good_images(root, 2)
    for index, folder in enumerate(["a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e", "b", "b/x", "c", "z"]):
        write_good_images(root / folder, 2, start=10 * index, suffix=".jpg" if index % 2 else ".png")
    (root / "a" / "notes.txt").write_text("not an image")
    write_good_images(root / ".hidden", 1)
    (root / "a" / "b" / "loop").symlink_to(root, target_is_directory=True)  # a loop back to the top
    (root / "z" / "alias").symlink_to(root / "b", target_is_directory=True)  # b again, through a link
    return root


def test_folders_are_listed_in_parallel_with_the_local_records_and_signatures(tmp_path, ray_address):
    from captionkit.core.records import open_source
    from captionkit.core.store import file_signature
    from captionkit.executors.ray_executor import RayExecutor

    root = _tree(tmp_path / "tree")
    expected = list(open_source(root))
    executor = RayExecutor()
    got = executor.list_records(open_source(root))
    assert got == expected and len(got) == 20  # same ids, paths and order; the loop and the alias cut
    assert executor.known_signatures == {str(record.path): file_signature(record.path) for record in got}
    hidden = open_source(root, include_hidden=True)
    assert executor.list_records(hidden) == list(open_source(root, include_hidden=True))


def _manifest_rows(root: Path) -> list[dict]:
    write_good_images(root / "images", 4)
    return [{"image": "images/img000.png", "tags": "red, round", "score": "0.50"},
            {"image": "images/img001.png", "tags": 'says "hi", twice', "score": ""},
            {"image": "", "tags": "no image here", "score": "1"},
            {"image": "images/img000.png", "tags": "repeated", "score": "2"},
            {"image": str(root / "images" / "img003.png"), "tags": "absolute", "score": "3"}]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv", "parquet"])
def test_manifests_are_read_by_ray_data_with_the_local_records(tmp_path, ray_address, kind):
    import csv

    import pyarrow as pa

    from captionkit.core.records import open_source
    from captionkit.executors.ray_executor import RayExecutor

    rows = _manifest_rows(tmp_path)
    manifest = tmp_path / f"list.{kind}"
    if kind == "jsonl":  # a byte-order mark, blank lines and a nested field
        lines = [json.dumps({**row, "extra": {"n": number}}) for number, row in enumerate(rows)]
        manifest.write_text("\ufeff" + lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n\n", encoding="utf-8")
    elif kind in ("csv", "tsv"):
        with manifest.open("w", newline="", encoding="utf-8-sig") as stream:  # as Excel writes it
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]), delimiter="\t" if kind == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    else:
        parquet.write_table(pa.Table.from_pylist(rows), manifest, row_group_size=2)
    expected = list(open_source(manifest))
    got = RayExecutor().list_records(open_source(manifest))
    assert got == expected and [record.id for record in got] == [
        "images/img000.png", "images/img001.png", "images/img003.png"]
    assert got[1].fields["tags"] == 'says "hi", twice' and got[1].fields["score"] == ""  # text stays text


def test_a_bad_manifest_line_is_named_as_locally(tmp_path, ray_address):
    from captionkit.core.records import open_source
    from captionkit.executors.ray_executor import RayExecutor

    write_good_images(tmp_path / "images", 2)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"image": "images/img000.png"}\n\n{"image": broken\n')
    with pytest.raises(CaptionkitError) as local:
        list(open_source(manifest))
    with pytest.raises(CaptionkitError) as remote:
        RayExecutor().list_records(open_source(manifest))
    assert str(remote.value) == str(local.value) and ":3: not valid JSON" in str(remote.value)


@pytest.mark.parametrize("outcome", ["nothing", "an error"])
def test_a_ray_instance_started_for_a_listing_that_ends_the_run_is_shut_down(monkeypatch, tmp_path, outcome):
    """No run follows an empty listing (or a failed one) to shut down the Ray this process started."""
    ray = pytest.importorskip("ray")
    from captionkit.core.records import open_source
    from captionkit.executors import ray_sources
    from captionkit.executors.ray_executor import RayExecutor

    stopped = []
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append(True))

    def listing(source, ray_module):
        if outcome == "an error":
            raise CaptionkitError("cannot read it")
        return [], {}

    monkeypatch.setattr(ray_sources, "list_records", listing)
    executor = RayExecutor()

    def start():
        executor._started_ray = True
        return ray

    monkeypatch.setattr(executor, "_ray", start)
    write_good_images(tmp_path, 1)
    if outcome == "an error":
        with pytest.raises(CaptionkitError):
            executor.list_records(open_source(tmp_path))
    else:
        assert executor.list_records(open_source(tmp_path)) == []
    assert stopped == [True] and executor._started_ray is False
