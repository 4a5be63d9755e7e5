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


@pytest.fixture(scope="module")
def one_torch_thread():
    """For training tests: tiny models gain nothing from a second thread, and a parallel
    operator that waits for a core another process holds runs up to ~100x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
