"""The one training loop: a trainer supplies data, loss, metrics and saved folders; the loop does the rest.

Why: the captioner and the tagger had each grown the same loop (gradient accumulation, mixed
precision through accelerate, evaluation, best/last/rotating checkpoints, exact resume,
logging, stop) and a fix in one did not reach the other. A trainer now implements
:class:`TrainingTask` and fills :class:`LoopSettings` from its config; :func:`run_training`
owns the steps.

Exact resume: a checkpoint holds the optimizer, scheduler, AMP scaler, the Python/NumPy/torch
RNG states, the task's extra state (an EMA) and the data position (epoch, batch in epoch),
so a resumed run repeats what the uninterrupted one would have done. The data order of an
epoch must depend only on (seed, epoch), which :meth:`TrainingTask.batches` promises.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

from captionkit.core.atomic import write_staged_json
from captionkit.core.errors import NothingSucceededError
from captionkit.train.checkpoints import (
    CheckpointManager,
    link_folder,
    remove_stale_temp_folders,
    write_folder_atomically,
)

_log = logging.getLogger(__name__)


class BatchLoss(NamedTuple):
    """One batch's loss: ``loss`` is back-propagated after division by the window's divisor;
    ``total / count`` is what the logs average (summed over tokens, images ...).

    ``total`` may be a detached device tensor: the loop sums it on the device and reads it
    only at logging steps, so a step never waits for the device to report its loss.
    """

    loss: Any
    total: Any
    count: float
    samples: int


class TrainingTask:
    """What a trainer supplies; the loop calls these and nothing else of the trainer."""

    #: True: the loss divisor needs the whole accumulation window (its token count), so the
    #: window is read before its first backward. False: batches stream one by one and the
    #: divisor is the window's number of batches.
    divisor_reads_window: bool = False
    #: True: the loss is computed under ``accelerator.autocast()`` as well as the forward (which
    #: ``accelerator.prepare`` wraps); False keeps a loss that must stay float32 outside it.
    loss_in_autocast: bool = True
    #: (generated, reference) pairs of the last evaluation, shown in TensorBoard.
    samples: list[tuple[str, str]] = []

    def begin(self, log_file: Path) -> None:
        """Write the run's own files (config, vocabulary, skipped-file report) once the run starts."""

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        """The batches of ``epoch`` from position ``start`` on; None for a batch that could not load."""
        raise NotImplementedError

    def loss(self, model: Any, batch: Any) -> BatchLoss:
        raise NotImplementedError

    def loss_divisor(self, window: list[Any]) -> Any:
        """What the window's summed losses are divided by (only with ``divisor_reads_window``);
        a float, or a device tensor that is never read back."""
        return float(len(window))

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (an EMA update)."""

    def train_mode(self, model: Any) -> None:
        """Put the model in training mode (after evaluation too); a task with frozen parts keeps them in eval mode."""
        model.train()

    def evaluate(self, model: Any) -> dict[str, float]:
        raise NotImplementedError

    def save_model(self, folder: Path) -> None:
        """What a checkpoint holds beside the loop's state: the weights and whatever resuming reads."""
        raise NotImplementedError

    def export(self, folder: Path, metrics: dict[str, float], progress: Progress, final: bool) -> None:
        """Write the servable model to ``folder`` atomically (the final model, and the best one with
        ``LoopSettings.best_dir``)."""
        raise NotImplementedError

    def state_objects(self) -> dict[str, Any]:
        """Objects with ``state_dict``/``load_state_dict`` saved in every checkpoint (an EMA)."""
        return {}

    def checkpoint_info(self, metrics: dict[str, float]) -> dict[str, Any]:
        """Keys added to the checkpoint's state file beside the loop's progress."""
        return {}


@dataclass
class LoopSettings:
    """When the loop steps, evaluates, saves and logs; each trainer fills it from its config."""

    output_dir: Path
    total_steps: int
    batches_per_epoch: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    has_validation: bool = False
    eval_every_steps: int | None = None  # None: at the end of every epoch
    metric: str | None = None  # picks the best checkpoint
    greater_is_better: bool = False
    save_every_steps: int | None = None
    save_every_epochs: int | None = None
    save_final_epoch: bool = False  # with save_every_epochs: also save the last epoch
    save_total_limit: int | None = None
    checkpoint_names: Literal["step", "epoch"] = "step"  # checkpoints/step-0000100 or epoch-0003
    last_dir: str | None = None  # a full checkpoint rewritten at the end of every epoch
    best_dir: str | None = None  # the task's export, rewritten whenever the metric improves
    stop_saves: bool = True  # a stop saves a mid-epoch checkpoint; False: the unfinished epoch is dropped
    state_dir: str = "."  # optimizer/scheduler/RNG files, relative to a checkpoint folder
    state_file: str = "training_state.json"  # progress, relative to a checkpoint folder
    log_every_steps: int | None = None  # step rows: train/loss, train/lr, train/epoch ...
    epoch_rows: bool = False  # one row per evaluation with the epoch's training loss (no step key)
    tensorboard_dir: str | None = None
    tensorboard_prefix: str = ""
    hparams: dict[str, Any] | None = None  # TensorBoard hyper-parameters
    wandb_project: str | None = None
    wandb_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint. ``epoch`` counts finished epochs."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    best_metric: float | None = None


@dataclass
class LoopResult:
    """What :func:`run_training` did, for the trainers' own result types."""

    progress: Progress
    start: Progress
    stopped: bool
    final_path: Path  # output_dir/final, or the checkpoint to resume from after a stop
    best_checkpoint: Path | None
    metrics: dict[str, float]  # the last evaluation
    history: list[dict[str, float]]  # one row per evaluation in this process
    train_loss: float | None
    samples_per_second: float
    log_file: Path


def to_device(batch: Any, device: Any, non_blocking: bool = False) -> Any:
    """A batch (dict, tuple or tensor) on ``device``; ``non_blocking`` copies from page-locked
    memory without waiting (host to device only)."""
    if isinstance(batch, dict):
        return {key: value.to(device, non_blocking=non_blocking) if hasattr(value, "to") else value
                for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(item.to(device, non_blocking=non_blocking) if hasattr(item, "to") else item
                           for item in batch)
    return batch.to(device, non_blocking=non_blocking)


def read_progress(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def run_training(task: TrainingTask, settings: LoopSettings, *, accelerator: Any, model: Any, optimizer: Any,
                 scheduler: Any, resume_from: Path | None = None,
                 stop: threading.Event | None = None) -> LoopResult:
    """Train ``model`` (already prepared by ``accelerator``) to ``settings.total_steps``; see the module doc.

    ``stop`` (set from another thread, e.g. the web UI's Stop button) is checked between
    optimizer steps: with ``stop_saves`` the run saves a checkpoint to resume from, else it
    drops the unfinished epoch (resume from ``last_dir``).
    """
    output = Path(settings.output_dir)
    from captionkit.train.runlog import run_log

    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_folders(output)
    with run_log(output, accelerator.is_main_process) as log_file:
        task.begin(log_file)
        loop = _Loop(task, settings, accelerator, model, optimizer, scheduler, log_file)
        try:
            if resume_from is not None:
                loop.load(Path(resume_from))
            return loop.run(stop)
        finally:
            loop.reporters.close()


class _Loop:
    def __init__(self, task: TrainingTask, settings: LoopSettings, accelerator: Any, model: Any, optimizer: Any,
                 scheduler: Any, log_file: Path) -> None:
        self.task, self.settings, self.accelerator = task, settings, accelerator
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.log_file = log_file
        self.output = Path(settings.output_dir)
        self.main = accelerator.is_main_process
        self.reporters = Reporters(settings, self.main)
        self.manager = CheckpointManager(self.output / "checkpoints", settings.save_total_limit, settings.metric,
                                         settings.greater_is_better)
        self.progress = Progress()
        self.history: list[dict[str, float]] = []
        self.metrics: dict[str, float] = {}
        self.last_row: dict[str, float] = {}
        self.evaluated_at = -1
        self.epoch_loss, self.epoch_count, self.epoch_started = 0.0, 0.0, time.perf_counter()
        self.steps_per_epoch = -(-settings.batches_per_epoch // settings.gradient_accumulation_steps)

    # -- checkpoints -------------------------------------------------------------------------

    def load(self, folder: Path) -> None:
        """Everything a checkpoint holds, back in place (the task loaded the weights)."""
        import torch

        state_dir = folder / self.settings.state_dir
        if not (state_dir / "optimizer.pt").is_file() and (folder / "optimizer.bin").is_file():
            # A tagger checkpoint of captionkit before the shared loop (accelerate's save_state).
            for item in (self.scheduler, *self.task.state_objects().values()):
                self.accelerator.register_for_checkpointing(item)
            self.accelerator.load_state(str(folder))
        else:
            self.optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", map_location="cpu",
                                                      weights_only=False))
            self.scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=False))
            scaler_file = state_dir / "scaler.pt"
            if self.accelerator.scaler is not None and scaler_file.exists():
                self.accelerator.scaler.load_state_dict(torch.load(scaler_file, weights_only=False))
            for name, item in self.task.state_objects().items():
                item.load_state_dict(torch.load(state_dir / f"{name}.pt", map_location="cpu", weights_only=False))
            _set_rng_state(torch.load(state_dir / "rng.pt", weights_only=False))
        state = read_progress(folder / self.settings.state_file)
        self.progress = Progress(**{key: state[key] for key in dataclasses.asdict(Progress()) if key in state})
        if self.progress.batch_in_epoch >= self.settings.batches_per_epoch:  # saved before the epoch rolled over
            self.progress.epoch, self.progress.batch_in_epoch = self.progress.epoch + 1, 0
        _log.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.progress.global_step,
                  self.progress.epoch, self.progress.batch_in_epoch)

    def write_checkpoint(self, folder: Path) -> None:
        import torch

        self.task.save_model(folder)
        state_dir = folder / self.settings.state_dir
        state_dir.mkdir(exist_ok=True)
        torch.save(self.optimizer.state_dict(), state_dir / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), state_dir / "scheduler.pt")
        if self.accelerator.scaler is not None:
            torch.save(self.accelerator.scaler.state_dict(), state_dir / "scaler.pt")
        for name, item in self.task.state_objects().items():
            torch.save(item.state_dict(), state_dir / f"{name}.pt")
        torch.save(_rng_state(), state_dir / "rng.pt")
        write_staged_json(folder / self.settings.state_file,
                          {**dataclasses.asdict(self.progress), **self.task.checkpoint_info(self.last_row)})

    def checkpoint_tag(self) -> str:
        if self.settings.checkpoint_names == "epoch":
            return f"epoch-{self.progress.epoch:04d}"
        return f"step-{self.progress.global_step:07d}"

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self) -> tuple[float | None, bool]:
        """Evaluate, log, track the best; returns the metric and whether it improved."""
        settings, progress = self.settings, self.progress
        metrics = self.task.evaluate(self.model)
        self.task.train_mode(self.model)
        self.metrics, self.evaluated_at = metrics, progress.global_step
        if settings.epoch_rows:
            row = {**metrics, "train_loss": float(self.epoch_loss) / max(1.0, float(self.epoch_count)),
                   "lr": self.scheduler.get_last_lr()[0], "epoch": progress.epoch,
                   "epoch_seconds": time.perf_counter() - self.epoch_started}
            epochs = -(-settings.total_steps // self.steps_per_epoch)
            _log.info("epoch %d/%d: %s", progress.epoch, epochs,
                      ", ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float)))
        else:
            row = {f"val/{key}": value for key, value in metrics.items()}
        self.history.append(row)
        self.last_row = row
        self.reporters.scalars(row, progress.global_step)
        self.reporters.samples(self.task.samples, progress.global_step)
        value = metrics.get(settings.metric) if settings.metric else None
        improved = value is not None and (progress.best_metric is None or (
            value > progress.best_metric if settings.greater_is_better else value < progress.best_metric))
        if improved:
            progress.best_metric = value
        return value, improved

    def after_step(self, end_of_epoch: bool) -> None:
        """Evaluate and save where the settings say, after an optimizer step."""
        settings, progress = self.settings, self.progress
        step = progress.global_step
        run_eval = settings.has_validation and (
            (settings.eval_every_steps is not None and step % settings.eval_every_steps == 0)
            or (settings.eval_every_steps is None and end_of_epoch))
        save = bool(settings.save_every_steps and step % settings.save_every_steps == 0) or bool(
            end_of_epoch and settings.save_every_epochs and (
                progress.epoch % settings.save_every_epochs == 0
                or (settings.save_final_epoch and step >= settings.total_steps)))
        last = end_of_epoch and settings.last_dir is not None
        metric = None
        # A checkpoint is always scored when there is validation data: otherwise "best"
        # would only be known for saves that happen to fall on an evaluation step.
        if run_eval or ((save or last) and settings.has_validation):
            metric, improved = self.evaluate()
            if improved and settings.best_dir is not None and self.main:
                self.task.export(self.output / settings.best_dir, self.last_row, progress, final=False)
        if save or last:
            self.accelerator.wait_for_everyone()
            if self.main:
                if last:
                    write_folder_atomically(self.output / settings.last_dir, self.write_checkpoint)
                if save:
                    # saved as last a moment ago, nothing changed since: the same files, linked, not written again
                    write = partial(link_folder, self.output / settings.last_dir) if last else self.write_checkpoint
                    self.manager.save(self.checkpoint_tag(), write, metric=metric)
            self.accelerator.wait_for_everyone()

    # -- the steps ----------------------------------------------------------------------------

    def run(self, stop: threading.Event | None) -> LoopResult:
        settings, progress, accelerator, task, model = (self.settings, self.progress, self.accelerator, self.task,
                                                         self.model)
        start = dataclasses.replace(progress)
        task.train_mode(model)
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        start_time = time.perf_counter()
        # Summed where the task's totals are (a device tensor): read back at logging steps only.
        window_loss: Any = 0.0
        window_count = 0.0
        non_blocking = accelerator.device.type == "cuda"
        last_train_loss: float | None = None
        stopped = False
        bpe = settings.batches_per_epoch
        while progress.global_step < settings.total_steps and not stopped:
            self.epoch_started = time.perf_counter()
            if progress.batch_in_epoch == 0:
                self.epoch_loss, self.epoch_count = 0.0, 0.0
            epoch_samples = 0
            iterator = task.batches(progress.epoch, progress.batch_in_epoch)
            while True:
                if stop is not None and stop.is_set():
                    stopped = True
                    break
                wanted = min(settings.gradient_accumulation_steps, bpe - progress.batch_in_epoch)
                stream: Any = (next(iterator) for _ in range(wanted))
                progress.batch_in_epoch += wanted
                if task.divisor_reads_window:
                    window = [to_device(batch, accelerator.device, non_blocking) for batch in stream
                              if batch is not None]
                    divisor, stream, last_position = task.loss_divisor(window), window, len(window) - 1
                else:
                    divisor, last_position = wanted, wanted - 1
                any_batch = False
                for position, batch in enumerate(stream):
                    if batch is None:
                        continue
                    batch = to_device(batch, accelerator.device, non_blocking)
                    sync = nullcontext() if position == last_position else accelerator.no_sync(model)
                    with sync, accelerator.autocast() if task.loss_in_autocast else nullcontext():
                        result = task.loss(model, batch)
                        accelerator.backward(result.loss / divisor)
                    any_batch = True
                    window_loss += result.total
                    window_count += result.count
                    self.epoch_loss += result.total
                    self.epoch_count += result.count
                    progress.samples_seen += result.samples
                    epoch_samples += result.samples
                grad_norm = None
                if settings.max_grad_norm and any_batch:
                    grad_norm = accelerator.clip_grad_norm_(parameters, settings.max_grad_norm)
                self.optimizer.step()
                if not accelerator.optimizer_step_was_skipped:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                progress.global_step += 1
                task.after_step(progress.global_step)
                end_of_epoch = progress.batch_in_epoch >= bpe
                if end_of_epoch:
                    progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                if settings.log_every_steps and (progress.global_step % settings.log_every_steps == 0
                                                 or progress.global_step == settings.total_steps):
                    elapsed = max(time.perf_counter() - start_time, 1e-9)
                    last_train_loss = float(window_loss) / max(float(window_count), 1.0)
                    values = {"train/loss": last_train_loss, "train/lr": self.scheduler.get_last_lr()[0],
                              "train/epoch": progress.epoch + progress.batch_in_epoch / bpe,
                              "train/samples_per_second": (progress.samples_seen - start.samples_seen) / elapsed}
                    if grad_norm is not None:
                        values["train/grad_norm"] = float(grad_norm)
                    self.reporters.scalars(values, progress.global_step)
                    window_loss, window_count = 0.0, 0.0
                if end_of_epoch:
                    self.require_samples(epoch_samples, f"epoch {progress.epoch}")
                self.after_step(end_of_epoch)
                if end_of_epoch or progress.global_step >= settings.total_steps:
                    break
            del iterator  # release the loader's workers before the next epoch starts new ones
        if stopped:
            return self.stopped(start, last_train_loss)
        if progress.global_step > start.global_step:
            self.require_samples(progress.samples_seen - start.samples_seen,
                                 f"{progress.global_step - start.global_step} steps")
        if last_train_loss is None and window_count:
            last_train_loss = float(window_loss) / float(window_count)
        elapsed = max(time.perf_counter() - start_time, 1e-9)
        samples_per_second = (progress.samples_seen - start.samples_seen) / elapsed
        if settings.has_validation and self.evaluated_at != progress.global_step:
            self.evaluate()
        accelerator.wait_for_everyone()
        final_path = self.output / "final"
        if self.main:
            task.export(final_path, self.last_row, progress, final=True)
        return self.result(start, False, final_path, last_train_loss, samples_per_second)

    def require_samples(self, count: int, span: str) -> None:
        """Training on nothing is no success: every image of the span skipped means no model is written."""
        import torch

        total = float(count)
        if self.accelerator.num_processes > 1:  # one process needs no device round trip
            total = float(self.accelerator.reduce(torch.tensor(total, device=self.accelerator.device), "sum"))
        if total == 0:
            raise NothingSucceededError(
                f"no training image could be read in {span} (each was skipped; the warnings above name them), "
                "so no model was written; fix or remove those files")

    def stopped(self, start: Progress, train_loss: float | None) -> LoopResult:
        progress = self.progress
        if not self.settings.stop_saves:
            last = self.output / (self.settings.last_dir or "last")
            _log.info("stopped during epoch %d; resume starts again from %s", progress.epoch + 1,
                      last if last.is_dir() else "the start (no epoch finished)")
            return self.result(start, True, self.output / "final", train_loss, 0.0)
        checkpoint = self.manager.root / self.checkpoint_tag()
        if self.main and progress.global_step > 0 and not checkpoint.is_dir():
            self.manager.save(checkpoint.name, self.write_checkpoint)
        _log.info("stopped at step %d of %d; resume from %s", progress.global_step, self.settings.total_steps,
                  checkpoint if checkpoint.is_dir() else "the start (no step was finished)")
        return self.result(start, True, checkpoint, train_loss, 0.0)

    def result(self, start: Progress, stopped: bool, final_path: Path, train_loss: float | None,
               samples_per_second: float) -> LoopResult:
        return LoopResult(progress=self.progress, start=start, stopped=stopped, final_path=final_path,
                          best_checkpoint=self.manager.best(), metrics=self.metrics, history=self.history,
                          train_loss=train_loss, samples_per_second=samples_per_second, log_file=self.log_file)


# -- logging --------------------------------------------------------------------------------


class Reporters:
    """``metrics.jsonl`` (append-only), TensorBoard and W&B, on the main process only.

    The JSONL log is appended line by line: rewriting it atomically on every step would
    cost quadratic time, and a crash can only cut its last line.
    """

    def __init__(self, settings: LoopSettings, enabled: bool) -> None:
        self.enabled = enabled
        self.with_step = not settings.epoch_rows
        self.prefix = settings.tensorboard_prefix
        self.tensorboard = None
        self.wandb = None
        self.jsonl = Path(settings.output_dir) / "metrics.jsonl"
        if not enabled:
            return
        if settings.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(Path(settings.output_dir) / settings.tensorboard_dir))
            if settings.hparams:
                self.tensorboard.add_hparams(settings.hparams, metric_dict={})
        if settings.wandb_project is not None:
            import wandb

            self.wandb = wandb.init(project=settings.wandb_project, dir=str(settings.output_dir),
                                    config=settings.wandb_config, resume="allow")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        with self.jsonl.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps({"step": step, **values} if self.with_step else values) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(self.prefix + key, value, step)
            self.tensorboard.flush()  # curves while the run lasts, not minutes later
        if self.wandb is not None:
            self.wandb.log({self.prefix + key: value for key, value in values.items()}, step=step)

    def samples(self, pairs: list[tuple[str, str]], step: int) -> None:
        if not self.enabled or not pairs:
            return
        if self.tensorboard is not None:
            table = "\n".join(f"| {reference} | {prediction} |" for prediction, reference in pairs)
            self.tensorboard.add_text("val/samples", "| reference | generated |\n|---|---|\n" + table, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"val/samples": wandb.Table(columns=["generated", "reference"],
                                                       data=[list(pair) for pair in pairs])}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


# -- RNG state ------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    import numpy
    import torch

    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy
    import torch

    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
