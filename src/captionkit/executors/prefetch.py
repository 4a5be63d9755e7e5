"""Batch N+1 made ready while the model runs batch N, on every executor (local, ``--devices``, Ray actors).

Why: whatever the model thread does besides the model (gathering decoded images into a batch,
unpacking a Ray block's pixels, copying them to the GPU) is time the GPU sits idle. A
:class:`Prefetcher` runs that on a thread of its own, ``depth`` batches ahead: the model thread
only takes the next ready batch. On CUDA, :func:`device_stager` copies a batch's pixels from
pinned host memory on a stream of their own (``non_blocking``), so the copy of batch N+1 runs
while batch N computes; the model's stream waits for that copy's event only when it needs it.

The producer's iterator is closed on the prefetch thread, and :meth:`Prefetcher.close` joins
the thread: a run leaves no thread behind, and a stop ends the producer after the item it is on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from captionkit.executors.transport import _on_pixels

log = logging.getLogger(__name__)

Batch = TypeVar("Batch")
POLL_S = 0.05  # how often a producer blocked on a full queue looks for close()


class Prefetcher(Generic[Batch]):
    """Iterates ``batches`` on a thread, ``depth`` ahead of the consumer; order and errors kept.

    An exception raised by the producer is raised to the consumer after the batches before it.
    ``waited_s`` is how long the consumer waited for its last batch (the model starved for input).
    """

    def __init__(self, batches: Iterator[Batch], depth: int = 1, name: str = "captionkit-prefetch") -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
        self._closing = threading.Event()
        self.waited_s = 0.0
        self._thread = threading.Thread(target=self._produce, args=(batches,), name=name, daemon=True)
        self._thread.start()

    def _produce(self, batches: Iterator[Batch]) -> None:
        try:
            for batch in batches:
                if not self._put(("batch", batch)):
                    return
            self._put(("end", None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(("error", error))
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # a generator's finally (cancelling decodes in flight) runs here, on this thread

    def _put(self, entry: tuple[str, Any]) -> bool:
        while not self._closing.is_set():
            try:
                self._queue.put(entry, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Batch]:
        while True:
            started = time.perf_counter()
            kind, value = self._queue.get()
            self.waited_s = time.perf_counter() - started
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        """Stop the producer (after the item it is on) and wait for its thread."""
        self._closing.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher[Batch]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class DeviceStager:
    """Copies a batch's pixels to a CUDA device ahead of the model: pinned host memory, a stream of its own.

    ``stage(items)`` (on the prefetch thread) returns (the items, the copy's event); an item whose copy
    fails (pinned memory exhausted, say) keeps its pixels on the host, where the model copies them as
    it always did. ``wait(event)`` (on the model's thread, before the batch runs) makes the model's
    stream wait for that copy, without the CPU waiting.
    """

    def __init__(self, device: str) -> None:
        import torch

        self.device = device
        self.copies = torch.cuda.Stream(device=device)
        self.consumer = torch.cuda.default_stream(device)  # the model thread's stream

    def _to_device(self, value: Any) -> Any:
        import torch

        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            moved = value.pin_memory().to(self.device, non_blocking=True)
            moved.record_stream(self.consumer)  # its memory is reused only after the model's stream is done
            return moved
        return value

    def stage(self, items: list[Any]) -> tuple[list[Any], Any]:
        import torch

        with torch.cuda.stream(self.copies):
            for item in items:
                try:
                    _on_pixels(item, self._to_device)
                except Exception as error:  # noqa: BLE001 - the model copies this one itself, as before
                    log.debug("pixels of %s stay on the host (%r)", item.record.id, error)
            event = torch.cuda.Event()
            event.record(self.copies)
        return items, event

    def wait(self, event: Any) -> None:
        self.consumer.wait_event(event)


def device_stager(step: Any) -> DeviceStager | None:
    """A :class:`DeviceStager` for a step whose model takes its pixels on a CUDA device, else None.

    A step opts in with ``staging_device`` (its model stacks the pixels with ``.to(device)``, which
    leaves pixels already there as they are); without CUDA there is nothing to copy ahead.
    """
    device = getattr(step, "staging_device", None)
    if device is None or not str(device).startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return DeviceStager(str(device))
