"""Shared fixtures: tiny models built offline from configs, and generated images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist every worker (and every CLI subprocess it starts) keeps to one torch
# thread: a parallel operator that waits for a core another worker holds runs far slower
# (measured here: `-n 2` with two threads per worker took twice as long as no xdist at all).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

from captionkit._torchvision_compat import ensure_torchvision  # noqa: E402

ensure_torchvision()

if XDIST_WORKER:
    import torch

    torch.set_num_threads(1)


def pytest_configure(config) -> None:
    """Mark this run's environment (tests/leftovers.py): every process a test starts inherits the mark."""
    if not XDIST_WORKER:
        import uuid

        from tests.leftovers import RUN_MARKER

        os.environ[RUN_MARKER] = uuid.uuid4().hex


def pytest_terminal_summary(terminalreporter) -> None:
    """Name and end the processes this run started that outlived it (a green run would hide them)."""
    from tests.leftovers import RUN_MARKER, end, outlived

    run = os.environ.get(RUN_MARKER)
    if XDIST_WORKER or not run or not Path("/proc").is_dir():
        return
    left = outlived(run, exclude={os.getpid()})
    if left:
        terminalreporter.section("processes this run left running (now killed)", yellow=True)
        for pid, command in sorted(left.items()):
            terminalreporter.line(f"{pid}: {command}")
        end(list(left))


@pytest.fixture(scope="session")
def tiny_florence(tmp_path_factory) -> Path:
    """A complete random-weight Florence-2 folder (model + processor + BPE tokenizer), 64 px input.

    Built once per run: under xdist the first worker builds it into the run's shared temp
    folder and the others wait for it (tests only read it)."""
    from captionkit.testing import build_tiny_florence2

    if not XDIST_WORKER:
        return build_tiny_florence2(tmp_path_factory.mktemp("tiny-florence2"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # one folder for all workers of this run
    folder = shared / "tiny-florence2"
    with FileLock(str(shared / "tiny-florence2.lock")):
        if not (folder / ".complete").exists():
            build_tiny_florence2(folder)
            (folder / ".complete").touch()
    return folder


class _SharedRay:
    """The shared instance of this test process (None when not running) and the last test that uses it."""

    context = None
    last_user: str | None = None


@pytest.fixture(scope="session")
def shared_ray():
    """One local Ray instance (2 CPUs) per test process, for every test that runs on a Ray it is given; its
    GCS address. An instance costs seconds of CPU to start and more in the Ray Data helper actors of its first
    run: started once, not once per module, and shut down right after the last test of this process's order
    that uses it (``pytest_runtest_teardown``): idle, it keeps ~8% of a core busy, and the tests after the
    Ray ones ran for a minute and a half. A module whose test classes run in actors registers itself with
    ``ray.cloudpickle.register_pickle_by_value``; tests about a Ray that captionkit starts run in a subprocess."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    # Ray runs its workers at niceness 15: behind the other xdist worker (and whatever else runs) its actors
    # waited minutes on a busy machine; at 0 they get their share
    _SharedRay.context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                                  _system_config={"worker_niceness": 0})
    yield ray.get_runtime_context().gcs_address
    if _SharedRay.context is not None:
        _stop_shared_ray()


def _stop_shared_ray() -> None:
    import shutil

    import ray

    context, _SharedRay.context = _SharedRay.context, None
    ray.shutdown()
    shutil.rmtree(context.address_info["session_dir"], ignore_errors=True)  # its logs, sockets: 0.2-0.7 MB


@pytest.hookimpl(trylast=True)  # after pytest has torn down that test's fixtures
def pytest_runtest_teardown(item, nextitem) -> None:
    """The shared Ray instance ends with the last test of the collection's order that uses it."""
    if _SharedRay.context is not None and item.nodeid == _SharedRay.last_user:
        _stop_shared_ray()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For training tests: tiny models gain nothing from a second thread, and a parallel
    operator that waits for a core another process holds runs up to ~100x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Seconds per test module (sum of its tests, both workers busy, measured on a loaded 2-core machine), for
# the modules that cost most; every other module is a few seconds (QUICK_MODULE_S). Only the order is drawn
# from these.
SLOW_MODULES = {
    "test_ray_executor.py": 200, "test_train_captioner_learning.py": 35, "test_examples.py": 40,
    "test_pipeline.py": 25, "test_docs.py": 25, "test_cli.py": 12, "test_ui_browser.py": 25,
    "test_train_tagger_run.py": 20, "test_train_captioner.py": 15, "test_devices_executor.py": 12,
    "test_exit_codes.py": 15, "test_ui_jobs.py": 15, "test_pipeline_dataflow_gen.py": 13, "test_vlm_lifecycle.py": 12,
    "test_transformers_serve.py": 40, "test_train_feature_cache.py": 20, "test_webdataset_storage.py": 40,
    "test_environment.py": 25, "test_webdataset.py": 20, "test_object_storage.py": 20,
}
QUICK_MODULE_S = 5


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected: the slices are cut from what runs
def pytest_collection_modifyitems(config, items: list) -> None:
    """Deal the tests out to the xdist workers (``_deal_out``), then note the last one that uses the shared Ray."""
    _deal_out(items)
    users = [item.nodeid for item in items if "shared_ray" in getattr(item, "fixturenames", ())]
    _SharedRay.last_user = users[-1] if users else None


def _deal_out(items: list) -> None:
    """Under pytest-xdist, start each worker's share with its costliest modules.

    ``--dist worksteal`` hands worker k the k-th contiguous slice of the collection (as evenly as it
    can by count) and a worker that runs dry steals the end of another's queue. In file order the
    Ray module (a third of the suite's time) began minutes into one worker's slice, so the run
    ended with that worker alone on it. Here the known-slow modules are dealt out to the slices
    longest first (each slice's heaviest first, a module's tests kept together for its module
    fixtures), and the quick tests fill the rest of each slice: the tail that is stolen is quick.
    The modules with tests on the shared Ray instance (``shared_ray``) go to one slice together: one
    instance started, not one per worker.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2 or len(items) < 2 * workers:
        return
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.path.name, []).append(item)
    on_ray = sorted((name for name, group in modules.items()
                     if any("shared_ray" in item.fixturenames for item in group)),
                    key=lambda name: -SLOW_MODULES.get(name, QUICK_MODULE_S))
    units: dict[str, tuple[float, list]] = {
        name: (SLOW_MODULES[name], group) for name, group in modules.items() if name in SLOW_MODULES
        and name not in on_ray}
    if on_ray:
        units["on Ray"] = (sum(SLOW_MODULES.get(name, QUICK_MODULE_S) for name in on_ray),
                           [item for name in on_ray for item in modules[name]])
    grouped = set(SLOW_MODULES) | set(on_ray)
    quick = [item for name, group in modules.items() if name not in grouped for item in group]
    sizes, left = [], len(items)  # the scheduler's slices: len(pending) // workers still to serve
    for remaining in range(workers, 0, -1):
        sizes.append(left // remaining)
        left -= sizes[-1]
    shares: list[list] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for weight, group in sorted(units.values(), key=lambda unit: -unit[0]):  # longest processing time first,
        fitting = [index for index in range(workers) if len(shares[index]) + len(group) <= sizes[index]]
        if not fitting:  # to the least loaded slice that has room
            return  # a selection of only slow tests: file order
        target = min(fitting, key=lambda index: loads[index])
        shares[target].extend(group)
        loads[target] += weight
    for index in range(workers):
        room = sizes[index] - len(shares[index])
        shares[index].extend(quick[:room])
        quick = quick[room:]
    items[:] = [item for share in shares for item in share]


# Captioner training (tests/test_train_captioner.py, tests/test_ui_training.py): one tiny base model and one
# shapes data set per module.
@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    from captionkit.testing import build_tiny_florence2

    return build_tiny_florence2(tmp_path_factory.mktemp("base"), init_std=None)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from captionkit.train.captioner_data import write_shapes_dataset

    folder = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(folder, 24, seed=4)
    return folder


_frozen_for: list = [None]  # the test module whose start last froze the heap


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """At the start of each test module, move every object alive then out of the garbage collector's sight.

    captionkit runs ``gc.collect()`` after unloads that leave a reference cycle, at the end of every UI job and on
    out-of-memory recovery (``free_accelerator_memory``), and tests run their own; a full collection walks every
    tracked object of the process: in a test process that has imported everything, 0.3-0.5 s each, hundreds of
    times (a profile of the in-process tests put 13% of their time there). Frozen objects are never
    collected, so only what lives across modules is frozen, after a collection: modules, classes, functions and
    session fixtures. The previous module's fixtures are torn down by then; what the module's tests create is
    collected as before."""
    import gc

    if item.path != _frozen_for[0]:
        _frozen_for[0] = item.path
        gc.collect()
        gc.freeze()
