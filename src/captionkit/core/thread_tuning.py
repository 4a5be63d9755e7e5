"""Measured choice of the model's CPU threads while decode workers share the same cores.

Why: on a CPU, torch splits every operator over all cores. When decode workers are
busy on those cores, each split operator waits for a core and a small model runs up
to twice as slowly (measured on 2 cores: 8.9 ms vs 4.0 ms per image for a tiny
Florence-2). A large model, where decoding is a rounding error, wants every core. So
nothing is assumed: when decoding costs at least a tenth of the model's time, the
executor runs a few batches with each candidate thread count and keeps the faster one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

DECODE_SHARE_WORTH_TUNING = 0.1
ROUNDS = 3  # candidates alternate batch by batch (A B A B A B), so drift and noise hit all of them alike


def torch_thread_candidates(device: str) -> list[int]:
    """Thread counts worth trying for a model on ``device`` (none off the CPU)."""
    if not str(device).startswith("cpu"):
        return []
    import torch

    current = torch.get_num_threads()
    return sorted({current, max(1, current // 2), 1}, reverse=True) if current > 1 else []


def set_torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


class ThreadTuner:
    """Batch 0 warms up; batch 1 measures the default and whether decoding competes; then all alternate."""

    def __init__(self, candidates: list[int], apply: Callable[[int], None]) -> None:
        self.candidates = candidates
        self.apply = apply
        self.batch = 0
        self.trial: list[tuple[int, float, int]] = []  # (threads, seconds, images)
        self.done = not candidates
        self.chosen: int | None = candidates[0] if candidates else None

    def _schedule(self, batch: int) -> int:
        """The candidate a batch (from batch 1 on) runs with: the default first, then each in turn."""
        return self.candidates[(max(batch, 1) - 1) % len(self.candidates)]

    def before_batch(self) -> None:
        if not self.done and self.batch >= 2:
            self.apply(self._schedule(self.batch))

    def after_batch(self, images: int, wall_s: float, model_s: float, decode_s_per_image: float) -> None:
        """``wall_s``: this batch from the end of the last; ``decode_s_per_image``: worker time per image."""
        self.batch += 1
        if self.done or images == 0 or self.batch == 1:
            return  # batch 0 pays for warm-up
        measured = self.batch - 1
        if measured == 1:  # is decoding a real share of the work?
            share = decode_s_per_image / max(model_s / images, 1e-9)
            if share < DECODE_SHARE_WORTH_TUNING:
                self.done = True
                return
            log.info("decoding costs %.0f%% of model time: measuring CPU threads %s", 100 * share,
                     self.candidates)
        self.trial.append((self._schedule(measured), wall_s, images))
        if len(self.trial) == ROUNDS * len(self.candidates):
            self._finish()

    def _finish(self) -> None:
        rates: dict[int, float] = {}
        for threads in self.candidates:
            seconds = sum(s for t, s, _ in self.trial if t == threads)
            images = sum(n for t, _, n in self.trial if t == threads)
            rates[threads] = images / seconds if seconds > 0 else 0.0
        self.chosen = max(rates, key=lambda threads: rates[threads])
        self.apply(self.chosen)
        self.done = True
        log.info("CPU threads for the model: %d (measured images/s: %s)", self.chosen,
                 ", ".join(f"{t} threads {r:.1f}" for t, r in rates.items()))
