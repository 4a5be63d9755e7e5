"""Training throughput of ``train_captioner`` against a plain PyTorch loop on the same model and data.

Why: the trainer adds token-normalised accumulation, deterministic sampling, logging and
checkpoint plumbing; this shows what that costs. Both loops use the same tiny Florence-2,
the same generated shapes data set, batch size, optimizer and number of steps, with no
validation or checkpoints in either. Prints samples/s for each and the ratio (ours / plain).

    .venv/bin/python benchmarks/train_captioner_throughput.py [--steps 60] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from captionkit._torchvision_compat import ensure_torchvision

ensure_torchvision()


def plain_loop(model_dir: Path, pairs: list[tuple[Path, str]], steps: int, batch_size: int) -> float:
    """The reference: decode, process, forward with labels, backward, AdamW step."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration.from_pretrained(model_dir).train()
    processor = AutoProcessor.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = random.Random(0)
    start = time.perf_counter()
    for _ in range(steps):
        batch = rng.sample(pairs, batch_size)
        images = [Image.open(path).convert("RGB") for path, _ in batch]
        inputs = processor(text=["<CAPTION>"] * batch_size, images=images, return_tensors="pt", padding=True)
        labels = processor.tokenizer([caption for _, caption in batch], return_tensors="pt", padding=True)
        target = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        loss = model(**inputs, labels=target).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch_size / (time.perf_counter() - start)


def ours(model_dir: Path, data_dir: Path, output: Path, steps: int, batch_size: int) -> float:
    from captionkit.train.captioner import CaptionerTrainConfig, OptimizerSettings, SchedulerSettings, train_captioner
    from captionkit.train.captioner_data import DatasetSpec

    config = CaptionerTrainConfig(
        model=str(model_dir), output_dir=output, data=[DatasetSpec(path=data_dir)], batch_size=batch_size,
        max_steps=steps, max_target_tokens=32, optimizer=OptimizerSettings(lr=1e-4),
        scheduler=SchedulerSettings(name="constant"), report_to=[], log_every_steps=10,
    )
    return train_captioner(config).samples_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()

    import torch

    from captionkit.testing import build_tiny_florence2
    from captionkit.train.captioner_data import write_shapes_dataset

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        pairs = write_shapes_dataset(root / "data", args.images, seed=0)
        model_dir = build_tiny_florence2(root / "model", init_std=0.2)
        torch.manual_seed(0)
        plain_loop(model_dir, pairs, 3, args.batch_size)  # warm-up (allocator, kernels)
        reference = plain_loop(model_dir, pairs, args.steps, args.batch_size)
        measured = ours(model_dir, root / "data", root / "out", args.steps, args.batch_size)
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, threads: {torch.get_num_threads()}, "
          f"steps: {args.steps}, batch size: {args.batch_size}")
    print(f"plain loop:      {reference:8.1f} samples/s")
    print(f"train_captioner: {measured:8.1f} samples/s")
    print(f"ratio (ours / plain): {measured / reference:.2f}")


if __name__ == "__main__":
    main()
