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
import math
from collections.abc import Callable
from dataclasses import dataclass

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


# ------------------------------------------------------------------------------ decode workers
HEADROOM = 1.25  # decode capacity kept above the model's rate: image sizes vary, cores get preempted
WINDOW = 2  # measured batches per setting (only batches decoded entirely at that setting count)
MIN_WINDOW_S = 0.5  # and at least this much wall time: a fast model's two batches (~0.1 s) are mostly noise
MAX_ROUNDS = 5  # settings tried before the best measured one is kept
STARVED_SHARE = 0.05  # the model waited this share of the wall time for decoded images: one more worker
FIRST_GUESS = 4  # until measured: the old fixed default
SAME_RATE = 0.03  # rates this close are noise: the formula's count is kept


def decode_worker_limit() -> int:
    """The most decode workers worth running: the CPUs this process may use."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclass
class _Setting:
    images: int = 0
    wall_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0


class DecodeWorkerTuner:
    """Picks how many threads decode ahead of the model, from measured decode and model times.

    Why: too few starve the model; too many take cores and the GIL from the model's own Python
    loop (on an H200, 12 decode threads gave 105.8 img/s where 4 gave 127.8). The count that
    keeps the model fed is ``ceil(decode seconds per image per worker / model seconds per image x
    HEADROOM)``. Batch 0 warms up; each setting is then measured over ``WINDOW`` batches (and at least
    ``MIN_WINDOW_S`` seconds) whose images were all decoded at that setting (the prefetched ones are
    not), a new count is applied and measured again, until the count stays (or ``MAX_ROUNDS``, then the
    best measured rate wins).
    A model that waited for decoded images while the formula says enough gets one worker more.
    Once the count stays, one worker fewer is measured too and kept when it is faster by more than
    ``SAME_RATE``: on a CPU the decode threads share cores with the model (measured here at 64 px:
    1 worker 134 img/s, 2 workers 124, where the formula said 2).
    """

    def __init__(self, limit: int, apply: Callable[[int], None], start: int = FIRST_GUESS) -> None:
        self.limit = max(1, limit)
        self.apply = apply
        self.current = min(max(1, start), self.limit)
        self.batch = 0
        self.window: list[tuple[int, float, float, float, float]] = []  # images, wall, model, decode, waited
        self.tried: dict[int, _Setting] = {}
        self.rounds = 0
        self.done = self.limit == 1
        self.note = ""

    def after_batch(self, images: int, wall_s: float, model_s: float, decode_s: float, waited_s: float,
                    decoded_at: set[int]) -> None:
        """One batch: its wall time, model time, decode time summed over its images (worker seconds), time
        the model thread waited for them, and the worker counts they were decoded at."""
        self.batch += 1
        if self.done or images == 0 or self.batch == 1 or decoded_at != {self.current}:
            return
        self.window.append((images, wall_s, model_s, decode_s, waited_s))
        if len(self.window) < WINDOW or sum(batch[1] for batch in self.window) < MIN_WINDOW_S:
            return
        count, wall, model, decode, waited = (sum(values) for values in zip(*self.window, strict=True))
        self.window = []
        setting = self.tried.setdefault(self.current, _Setting())
        setting.images += count
        setting.wall_s += wall
        self.rounds += 1
        decode_per_image, model_per_image = decode / count, max(model / count, 1e-9)
        needed = min(self.limit, max(1, math.ceil(decode_per_image / model_per_image * HEADROOM)))
        starved = waited > STARVED_SHARE * wall
        if starved and needed <= self.current:
            needed = min(self.limit, self.current + 1)
        self.note = (f"decode {1000 * decode_per_image:.1f} ms per image per worker, model "
                     f"{1000 * model_per_image:.1f} ms per image")
        if needed != self.current and needed not in self.tried and self.rounds < MAX_ROUNDS:
            self.current = needed
            self.apply(needed)
            return
        fewer = self.current - 1
        if needed == self.current and fewer >= 1 and fewer not in self.tried and not starved \
                and self.rounds < MAX_ROUNDS:  # on shared cores a decode thread takes CPU from the model
            self.current = fewer
            self.apply(fewer)
            return
        if needed != self.current or fewer in self.tried:  # tried before (or out of rounds): the best measured
            best = max(self.tried, key=lambda workers: self.tried[workers].rate)
            if needed in self.tried and self.tried[needed].rate * (1 + SAME_RATE) >= self.tried[best].rate:
                best = needed  # within the noise of the best: the formula's count
            if best != self.current:
                self.current = best
                self.apply(best)
        self.done = True
        log.info("decode workers: %d, chosen by measurement (%s; measured images/s: %s; --workers N sets it)",
                 self.current, self.note,
                 ", ".join(f"{workers} workers {setting.rate:.1f}" for workers, setting in sorted(self.tried.items())))
