"""The contract between steps (which know models) and executors (which know scheduling).

An executor calls ``prepare`` in parallel workers (decode + preprocess), groups the
results into batches, calls ``run_batch`` on the main thread, stores the raw results and
renders them with ``render``. Steps know nothing about threads, stores or files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from captionkit.core.records import Record


@dataclass
class Prepared:
    """A record after decode + preprocessing, ready for the model."""

    record: Record
    payload: Any
    original_size: tuple[int, int]
    content_hash: str
    notes: list[str] = field(default_factory=list)


class Step(Protocol):
    """What an executor needs from a step.

    Optional: ``outputs_present(raw) -> bool`` for a step that writes files (the image
    generator): a stored result whose files are gone is not done, and runs again.
    """

    field: str  # the record field (and store step name) this step writes
    batch_size: int

    def fingerprint(self) -> dict[str, Any]:
        """Settings that determine the raw result; a change means the model must run again."""

    def render_settings(self) -> dict[str, Any]:
        """Settings that only change how raw results become text (no model needed)."""

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def prepare(self, record: Record) -> Prepared:
        """Decode and preprocess one image; raises ImageLoadError for bad files. Thread-safe."""

    def run_batch(self, items: list[Prepared]) -> list[Any]:
        """Run the model on a batch; one JSON-able raw result per item, in order."""

    def render(self, raw: Any) -> str:
        """Text for the sidecar from a raw result."""

    def recover_from_oom(self) -> None:
        """Release cached accelerator memory after an out-of-memory error."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch's (CUDA/MPS) out-of-memory errors, without importing torch."""
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()
