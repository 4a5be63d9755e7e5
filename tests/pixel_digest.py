"""A model stand-in without torch for tests about an executor, not a model (tests on Ray, mostly).

A Ray worker that unpickles a Florence-2 step imports torch, transformers and torchvision (~3.5 s of CPU per
process) before it does anything; one that unpickles :class:`PixelDigest` starts in about a second. Where a test
proves what the executor does (parity, reading and writing on workers, killed actors or drivers), this model says
as much: its caption is a digest of the decoded pixels, so equal captions mean the same image bytes were decoded.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def send_by_value(*modules: str) -> None:
    """Ray workers do not have the tests folder on their path: classes of these modules travel by value."""
    import ray

    for name in ("tests.pixel_digest", *modules):
        ray.cloudpickle.register_pickle_by_value(sys.modules[name])


class PixelDigest:
    """The caption is a digest of the decoded pixels (the CPU stage decodes them, as Florence-2's does). Its worker
    process ends whenever a batch holds the image ``poison`` (a file that crashes the decoder, say); each load leaves
    a file in ``loads``."""

    def __init__(self, poison: str | None = None, loads: Path | None = None) -> None:
        self.poison, self.loads = poison, str(loads) if loads else None

    def fingerprint(self) -> dict:
        return {"backend": "pixel-digest"}  # the same model with or without poison: a rerun reuses results

    def load(self) -> None:
        if self.loads:
            Path(self.loads, f"{os.getpid()}-{time.monotonic_ns()}").touch()

    def load_processor(self) -> None: ...

    def unload(self) -> None: ...

    def image_size(self) -> None:
        return None

    def preprocess(self, image) -> str:
        import hashlib

        return hashlib.sha1(image.tobytes()).hexdigest()[:16]

    def caption_batch(self, requests) -> list[str]:
        if any(request.key == self.poison for request in requests):
            os._exit(1)
        return [f"pixels {request.payload}" for request in requests]

    def render_texts(self, raw: str) -> list[str]:
        return [raw]

    def recover_from_oom(self) -> None: ...


RUN_LIMIT_S = 240  # a run on Ray that has not ended by then hangs (a fixed run takes seconds)


def _wait_once(marker: str) -> None:
    """Once per marker file: write this process's pid there and wait (to be killed, or for good as a hung model)."""
    if os.path.exists(marker):
        return
    Path(marker + ".tmp").write_text(str(os.getpid()))
    os.replace(marker + ".tmp", marker)
    time.sleep(RUN_LIMIT_S + 60)  # killed long before this (a hung one is killed by the test at its end)


class HangsOn(PixelDigest):
    """Once per marker file, a model actor writes its pid there and waits (to be killed, or for good as a hung model
    would): while loading (``when="load"``) or in the batch that holds the image ``when``."""

    def __init__(self, marker: Path, when: str) -> None:
        super().__init__()
        self.marker, self.when = str(marker), when

    def load(self) -> None:
        if self.when == "load":
            _wait_once(self.marker)
        super().load()

    def caption_batch(self, requests) -> list[str]:
        if any(request.key == self.when for request in requests):
            _wait_once(self.marker)
        return super().caption_batch(requests)


class HangsInBatch(PixelDigest):
    """Once per marker file, a model actor writes its pid there in its ``number``-th batch and waits: the batches
    before it were returned (so the driver commits them), whatever order the blocks reached the actor in."""

    def __init__(self, marker: Path, number: int) -> None:
        super().__init__()
        self.marker, self.number, self.calls = str(marker), number, 0

    def caption_batch(self, requests) -> list[str]:
        self.calls += 1
        if self.calls == self.number:
            _wait_once(self.marker)
        return super().caption_batch(requests)
