"""The shared training loop serves any task: a third one, a small net on generated numbers, trains
through the same loop as the captioner and the tagger, and a stopped-and-resumed run ends bit for
bit where an uninterrupted one ends, with mid-epoch checkpoints (the captioner's way) and with
epoch checkpoints that drop an unfinished epoch (the tagger's way)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from captionkit.train.accelerator import new_accelerator
from captionkit.train.checkpoints import write_folder_atomically
from captionkit.train.loop import BatchLoss, LoopSettings, TrainingTask, run_training

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LinearTask(TrainingTask):
    """y = x . (1, -2, 0.5) + noise, 40 samples in batches of 4, a new order every epoch."""

    def __init__(self, model: torch.nn.Module, stop_after: int | None = None) -> None:
        self.stop, self.stop_after = threading.Event(), stop_after  # the web UI's Stop button, pressed
        generator = torch.Generator().manual_seed(7)
        self.x = torch.randn(40, 3, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(40, generator=generator)
        self.model = model

    def batches(self, epoch: int, start: int):
        order = torch.randperm(40, generator=torch.Generator().manual_seed(epoch))
        for first in range(start * 4, 40, 4):
            yield self.x[order[first:first + 4]], self.y[order[first:first + 4]]

    def loss(self, model, batch) -> BatchLoss:
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y, reduction="sum")
        return BatchLoss(loss, float(loss.detach()), len(y), len(y))

    def after_step(self, step: int) -> None:
        if step == self.stop_after:
            self.stop.set()

    def evaluate(self, model) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            return {"val_loss": float(torch.nn.functional.mse_loss(model(self.x).squeeze(-1), self.y))}

    def save_model(self, folder: Path) -> None:
        torch.save(self.model.state_dict(), folder / "weights.pt")

    def export(self, folder: Path, metrics, progress, final: bool) -> None:
        write_folder_atomically(folder, self.save_model)


def train(output: Path, stop_after: int | None = None, resume: Path | None = None, task_type=LinearTask, **policy):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    if resume is not None:
        model.load_state_dict(torch.load(resume / "weights.pt"))
    task = task_type(model, stop_after)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 12)
    accelerator = new_accelerator(cpu=True, mixed_precision="no")
    task.model, optimizer = accelerator.prepare(model, optimizer)
    # 10 batches an epoch in windows of 3: 4 steps an epoch, the last window one batch.
    settings = LoopSettings(output_dir=output, total_steps=12, batches_per_epoch=10, gradient_accumulation_steps=3,
                            max_grad_norm=1.0, has_validation=True, metric="val_loss", **policy)
    return run_training(task, settings, accelerator=accelerator, model=task.model, optimizer=optimizer,
                        scheduler=scheduler, resume_from=resume, stop=task.stop)


@pytest.mark.parametrize("policy", [
    dict(eval_every_steps=3, save_every_steps=3, log_every_steps=1),  # the captioner's way
    dict(save_every_epochs=1, checkpoint_names="epoch", last_dir="last", best_dir="best", stop_saves=False,
         epoch_rows=True),  # the tagger's way
], ids=["mid-epoch-checkpoints", "epoch-checkpoints"])
def test_a_third_task_resumes_bit_for_bit_through_the_shared_loop(tmp_path, policy):
    whole = train(tmp_path / "whole", **policy)
    assert not whole.stopped and whole.progress.global_step == 12 and whole.progress.epoch == 3
    stopped = train(tmp_path / "stopped", stop_after=6, **policy)  # step 7 would be mid-epoch 2
    assert stopped.stopped and stopped.progress.global_step == 6
    if policy.get("stop_saves", True):
        checkpoint = stopped.final_path
        assert checkpoint.name == "step-0000006" and (checkpoint / "training_state.json").is_file()
    else:
        checkpoint = tmp_path / "stopped" / "last"  # the unfinished second epoch is dropped
        assert not (tmp_path / "stopped" / "checkpoints" / "epoch-0002").exists()
    resumed = train(tmp_path / "stopped", resume=checkpoint, **policy)
    assert resumed.start.global_step == (6 if checkpoint.name.startswith("step") else 4)
    expected = torch.load(whole.final_path / "weights.pt")
    actual = torch.load(resumed.final_path / "weights.pt")
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    assert resumed.metrics == whole.metrics and resumed.progress == whole.progress
    assert whole.metrics["val_loss"] < 0.5 * LinearTask(None).y.var()  # it learned


def test_an_epoch_checkpoint_saved_with_last_shares_its_files_and_resumes_after_last_moved_on(tmp_path):
    """At the end of an epoch ``last`` and ``checkpoints/epoch-N`` hold the same state: the second is
    made of hard links to the first's files instead of being serialised again. Replacing ``last`` in
    later epochs must leave the epoch checkpoint whole: resuming from it ends bit for bit like the
    uninterrupted run."""
    import os

    policy = dict(save_every_epochs=1, checkpoint_names="epoch", last_dir="last", best_dir="best", stop_saves=False,
                  epoch_rows=True)
    whole = train(tmp_path / "whole", **policy)
    last, third = tmp_path / "whole" / "last", tmp_path / "whole" / "checkpoints" / "epoch-0003"
    files = sorted(path.relative_to(last) for path in last.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(third) for path in third.rglob("*") if path.is_file())
    assert all(os.path.samefile(last / name, third / name) for name in files)  # the same bytes, not a copy
    first = tmp_path / "whole" / "checkpoints" / "epoch-0001"  # linked to last at step 4, which moved on twice
    assert json.loads((first / "training_state.json").read_text())["global_step"] == 4
    resumed = train(tmp_path / "resumed", resume=first, **policy)
    assert resumed.start.global_step == 4
    expected = torch.load(whole.final_path / "weights.pt")
    actual = torch.load(resumed.final_path / "weights.pt")
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    assert resumed.metrics == whole.metrics and resumed.progress == whole.progress


class DeviceTotalTask(LinearTask):
    """Reports each batch's loss total as a tensor, as the captioner does to spare a host read per
    batch; ``steps`` keeps, per optimizer step, the (total, count) pairs the logs must average."""

    def __init__(self, model: torch.nn.Module, stop_after: int | None = None) -> None:
        super().__init__(model, stop_after)
        self.steps: list[list[tuple[float, int]]] = [[]]

    def loss(self, model, batch) -> BatchLoss:
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y, reduction="sum")
        self.steps[-1].append((loss.item(), len(y)))
        return BatchLoss(loss, loss.detach(), len(y), len(y))

    def after_step(self, step: int) -> None:
        self.steps.append([])


@pytest.mark.parametrize("policy", [
    dict(log_every_steps=5),  # step rows: windows of 5 steps, and the last step's row (12)
    dict(epoch_rows=True),  # one row per evaluation (the end of each epoch) with the epoch's loss
], ids=["step-rows", "epoch-rows"])
def test_losses_summed_on_the_device_log_the_mean_of_their_steps(tmp_path, policy):
    tasks: list[DeviceTotalTask] = []

    def task_type(model, stop_after):
        tasks.append(DeviceTotalTask(model, stop_after))
        return tasks[-1]

    train(tmp_path, task_type=task_type, **policy)
    steps = tasks[0].steps[:-1]
    assert len(steps) == 12

    def mean(chosen: list[list[tuple[float, int]]]) -> float:
        return sum(total for step in chosen for total, _ in step) / sum(count for step in chosen for _, count in step)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if "log_every_steps" in policy:
        logged = [(row["step"], row["train/loss"]) for row in rows if "train/loss" in row]
        expected = [(5, mean(steps[0:5])), (10, mean(steps[5:10])), (12, mean(steps[10:12]))]
    else:
        logged = [(row["epoch"], row["train_loss"]) for row in rows if "train_loss" in row]
        expected = [(1, mean(steps[0:4])), (2, mean(steps[4:8])), (3, mean(steps[8:12]))]  # 4 steps an epoch
    assert [step for step, _ in logged] == [step for step, _ in expected]
    for (_, value), (_, wanted) in zip(logged, expected, strict=True):
        assert value == pytest.approx(wanted, rel=1e-6)
