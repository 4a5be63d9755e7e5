"""Shared fixtures: tiny models built offline from configs, and generated images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from captionkit._torchvision_compat import ensure_torchvision  # noqa: E402

ensure_torchvision()


@pytest.fixture(scope="session")
def tiny_florence(tmp_path_factory) -> Path:
    """A complete random-weight Florence-2 folder (model + processor + BPE tokenizer), 64 px input."""
    from captionkit.testing import build_tiny_florence2

    return build_tiny_florence2(tmp_path_factory.mktemp("tiny-florence2"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For training tests: tiny models gain nothing from a second thread, and a parallel
    operator that waits for a core another process holds runs up to ~100x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
