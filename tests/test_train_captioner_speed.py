"""Captioner training without overhead: length-grouped batches, the fused AdamW kernel, data
workers, and no reads of device values by the trainer between logging steps."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch
from PIL import Image

from captionkit.train.captioner import (
    CaptionerTrainConfig,
    adamw_kernel,
    data_workers,
    train_captioner,
    training_sampler,
)
from captionkit.train.captioner_data import (
    AugmentConfig,
    CaptionCollator,
    CaptionItem,
    DatasetSpec,
    EpochBatchSampler,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def padding(batches: list[list[int]], lengths: list[int]) -> int:
    """Pad positions the batches hold: each is padded to its longest caption."""
    return sum(max(lengths[index] for index in batch) * len(batch) - sum(lengths[index] for index in batch)
               for batch in batches)


def test_length_grouped_batches_hold_every_sample_once_and_pad_less():
    size, lengths = 1003, [random.Random(index).randint(1, 80) for index in range(1003)]
    grouped = EpochBatchSampler(size, 4, seed=5, lengths=lengths)  # groups of 200: 5 full, 1 partial
    shuffled = EpochBatchSampler(size, 4, seed=5)
    epochs = []
    for epoch in (0, 1):
        grouped.set_epoch(epoch)
        shuffled.set_epoch(epoch)
        batches = list(grouped)
        assert sorted(index for batch in batches for index in batch) == list(range(size))
        assert len(batches) == grouped.batches_per_epoch() == 251
        assert padding(batches, lengths) < padding(list(shuffled), lengths) / 5
        assert max(lengths[index] for index in batches[0]) == max(lengths)  # out of memory at once, if at all
        grouped.set_epoch(epoch, 7)  # a resumed epoch goes on with the batches the whole one had next
        assert list(grouped) == batches[7:]
        epochs.append(batches)
    assert epochs[0] != epochs[1]  # a new grouping every epoch ...
    again = EpochBatchSampler(size, 4, seed=5, lengths=lengths)
    again.set_epoch(1)
    assert list(again) == epochs[1]  # ... that depends only on (seed, epoch)
    shards = [EpochBatchSampler(size, 4, seed=5, lengths=lengths, process_index=rank, num_processes=2)
              for rank in (0, 1)]
    first, second = (list(shard) for shard in shards)
    assert len(first) == len(second) == 125  # of the 251 batches
    assert not {index for batch in first for index in batch} & {index for batch in second for index in batch}


def test_group_by_length_reaches_the_training_batches(base_model, tmp_path):
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(base_model).tokenizer
    words = ["red", "green", "circle", "square", "triangle", "and", "a", "blue"]
    rng = random.Random(0)
    items = [CaptionItem(tmp_path / f"{number}.png", " ".join(rng.choices(words, k=rng.randint(1, 30))), "<CAPTION>")
             for number in range(96)]
    lengths = [min(len(ids), 24) for ids in tokenizer([item.caption for item in items])["input_ids"]]

    def batches(**settings) -> list[list[int]]:
        config = CaptionerTrainConfig(model=str(base_model), output_dir=tmp_path, data=[DatasetSpec(path=tmp_path)],
                                      batch_size=4, max_target_tokens=24, **settings)
        return [[index for epoch, index in batch] for batch in training_sampler(config, items, tokenizer)]

    grouped, shuffled = batches(group_by_length=True), batches()
    assert sorted(index for batch in grouped for index in batch) == list(range(96))
    assert padding(grouped, lengths) < padding(shuffled, lengths) / 4


def test_collator_counts_caption_tokens_on_the_host(base_model):
    from transformers import AutoProcessor

    picture = Image.new("RGB", (64, 64), "blue")
    samples = [{"image": picture, "task": "<CAPTION>", "caption": caption, "index": number}
               for number, caption in enumerate(["a red circle", "a red circle and a blue square and a dot"])]
    batch = CaptionCollator(AutoProcessor.from_pretrained(base_model), 64)(samples)
    assert batch["target_tokens"] == int((batch["labels"] != -100).sum()) > 0


def test_data_workers_and_optimizer_kernel_follow_the_device():
    assert data_workers(None, torch.device("cpu")) == 0  # the model's threads have every core
    assert 1 <= data_workers(None, torch.device("cuda")) <= 4
    assert data_workers(3, torch.device("cpu")) == 3 and data_workers(0, torch.device("cuda")) == 0
    assert adamw_kernel(torch.device("cuda")) == adamw_kernel(torch.device("cpu")) == {"fused": True}
    assert adamw_kernel(torch.device("mps")) == {"foreach": True}


HOST_READS = ("__float__", "__int__", "__bool__", "item", "tolist", "numpy", "cpu")


@pytest.fixture
def host_reads(monkeypatch) -> list[str]:
    """Every read of a tensor's value back to the host made by captionkit's training code (each one
    would make a GPU step wait for the device), as "module:line"."""
    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1)
            # The collator's reads are of the host tensors it makes (in a worker process when there are workers).
            module = caller.f_globals.get("__name__", "")
            if module.startswith("captionkit.train") and module != "captionkit.train.captioner_data":
                reads.append(f"{caller.f_globals['__name__']}:{caller.f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads


def test_steps_between_logs_read_nothing_back_from_the_device(base_model, shapes, tmp_path, host_reads):
    def run(steps: int) -> list[str]:
        del host_reads[:]
        # 24 images, batch 4, windows of 2 batches: 3 steps an epoch; one log row, at the last step
        train_captioner(CaptionerTrainConfig(
            model=str(base_model), output_dir=tmp_path / str(steps), data=[DatasetSpec(path=shapes)], batch_size=4,
            gradient_accumulation_steps=2, max_steps=steps, log_every_steps=steps, max_target_tokens=32,
            report_to=[]))
        return list(host_reads)

    short, long = run(3), run(9)
    assert short  # the log row's reads are seen
    assert len(long) == len(short), sorted(set(long))  # 6 more steps (2 more epochs) read nothing more


def test_data_workers_train_exactly_as_the_main_process(base_model, shapes, tmp_path):
    def losses(workers: int) -> list[float]:
        output = tmp_path / str(workers)
        train_captioner(CaptionerTrainConfig(
            model=str(base_model), output_dir=output, data=[DatasetSpec(path=shapes)], batch_size=8, epochs=2,
            log_every_steps=1, max_target_tokens=32, report_to=[], num_workers=workers, group_by_length=True,
            save_every_steps=6, augment=AugmentConfig(shuffle_parts=True, separator=" and ")))
        rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        return [row["train/loss"] for row in rows if "train/loss" in row]

    in_process = losses(0)  # 24 images, batch 8: 6 steps, each epoch with its own augmented captions
    assert len(in_process) == 6 and losses(2) == in_process
    state = torch.load(tmp_path / "0" / "checkpoints" / "step-0000006" / "training_state" / "optimizer.pt",
                       weights_only=False)
    assert all(group["fused"] for group in state["param_groups"])  # and resumes with it
