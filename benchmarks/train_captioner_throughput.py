"""Training throughput of ``train_captioner`` against a plain PyTorch loop on the same model and data.

Why: the trainer adds token-normalised accumulation, deterministic sampling, logging and
checkpoint plumbing; this shows what that costs. Both loops use the same tiny Florence-2,
the same generated shapes data set, batch size, optimizer, device, precision and number of
steps, with no validation or checkpoints in either. Prints samples/s for each, the ratio
(ours / plain) and each loop's training loss at its first and last logged step.

``--device`` picks where both loops run (the trainer through accelerate: ``cpu`` sets its
``cpu`` option, ``cuda`` needs a GPU); ``--mixed-precision`` is the trainer's option (the
plain loop uses the same autocast, with a gradient scaler for fp16); ``--mode lora`` wraps
both in the trainer's LoRA; ``--mode qlora`` (CUDA + bitsandbytes) runs only the trainer,
since a plain 4-bit loop would be a second QLoRA implementation to keep in step.

``--cache-vision-features`` (mode lora: the vision tower is frozen) adds a third run, the
trainer with ``cache_vision_features: true`` on the same steps: its first epoch computes and
stores the features, later epochs read them. Its samples/s covers every epoch, the first
included; use few images and enough steps for several epochs (``--images 128 --steps 64``:
8 epochs at batch 16).

    .venv/bin/python benchmarks/train_captioner_throughput.py [--steps 60] [--batch-size 16]
    python benchmarks/train_captioner_throughput.py --device cuda --mixed-precision bf16 --mode lora --lr 1e-3
    python benchmarks/train_captioner_throughput.py --mode lora --cache-vision-features --images 128 --steps 64
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from captionkit._torchvision_compat import ensure_torchvision

ensure_torchvision()


def plain_loop(model_dir: Path, pairs: list[tuple[Path, str]], steps: int, batch_size: int, device: str = "cpu",
               mixed_precision: str = "no", mode: str = "full", lr: float = 1e-4,
               losses: list[float] | None = None) -> float:
    """The reference: decode, process, forward with labels, backward, AdamW step (samples/s).

    Each step's loss is appended to ``losses`` when given.
    """
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration.from_pretrained(model_dir).to(device).train()
    if mode == "lora":
        from captionkit.train.lora import LoraSettings, apply_lora

        model = apply_lora(model, LoraSettings())
    processor = AutoProcessor.from_pretrained(model_dir)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    scaler = torch.amp.GradScaler(device) if mixed_precision == "fp16" else None
    rng = random.Random(0)
    start = time.perf_counter()
    for _ in range(steps):
        batch = rng.sample(pairs, batch_size)
        images = [Image.open(path).convert("RGB") for path, _ in batch]
        inputs = processor(text=["<CAPTION>"] * batch_size, images=images, return_tensors="pt", padding=True)
        labels = processor.tokenizer([caption for _, caption in batch], return_tensors="pt", padding=True)
        target = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        inputs = {key: value.to(device) for key, value in inputs.items()}
        autocast = torch.autocast(torch.device(device).type, dtype=amp_dtype) if amp_dtype else nullcontext()
        with autocast:
            loss = model(**inputs, labels=target.to(device)).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if losses is not None:
            losses.append(float(loss.detach()))  # waits for the device, like the trainer's logging
    return steps * batch_size / (time.perf_counter() - start)


def ours(model_dir: Path, data_dir: Path, output: Path, steps: int, batch_size: int, device: str = "cpu",
         mixed_precision: str = "no", mode: str = "full", lr: float = 1e-4, log_every: int = 10,
         losses: list[float] | None = None, cache_vision_features: bool = False) -> float:
    """``train_captioner`` with the same settings (samples/s); its logged losses go to ``losses``."""
    from captionkit.train.captioner import CaptionerTrainConfig, OptimizerSettings, SchedulerSettings, train_captioner
    from captionkit.train.captioner_data import DatasetSpec

    config = CaptionerTrainConfig(
        model=str(model_dir), output_dir=output, data=[DatasetSpec(path=data_dir)], batch_size=batch_size,
        max_steps=steps, max_target_tokens=32, optimizer=OptimizerSettings(lr=lr),
        scheduler=SchedulerSettings(name="constant"), report_to=[], log_every_steps=log_every,
        mode=mode, mixed_precision=mixed_precision, cpu=device == "cpu", cache_vision_features=cache_vision_features,
    )
    result = train_captioner(config)
    if losses is not None:
        metrics = output / "metrics.jsonl"
        for line in metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []:
            row = json.loads(line)
            if "train/loss" in row:
                losses.append(float(row["train/loss"]))
    return result.samples_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu or cuda")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--mode", choices=["full", "lora", "qlora"], default="full")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--log-every", type=int, default=10, help="trainer log interval (its loss points)")
    parser.add_argument("--cache-vision-features", action="store_true",
                        help="also run the trainer with cache_vision_features (mode lora)")
    args = parser.parse_args()
    if args.cache_vision_features and args.mode != "lora":
        raise SystemExit("--cache-vision-features needs --mode lora (a frozen vision tower in both loops)")

    import torch

    from captionkit.testing import build_tiny_florence2
    from captionkit.train.captioner_data import write_shapes_dataset

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no GPU")
    plain_losses: list[float] = []
    our_losses: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        pairs = write_shapes_dataset(root / "data", args.images, seed=0)
        model_dir = build_tiny_florence2(root / "model", init_std=0.2)
        torch.manual_seed(0)
        reference = None
        if args.mode != "qlora":
            options = {"device": device, "mixed_precision": args.mixed_precision, "mode": args.mode, "lr": args.lr}
            plain_loop(model_dir, pairs, 3, args.batch_size, **options)  # warm-up (allocator, kernels)
            reference = plain_loop(model_dir, pairs, args.steps, args.batch_size, losses=plain_losses, **options)
        measured = ours(model_dir, root / "data", root / "out", args.steps, args.batch_size, device=device,
                        mixed_precision=args.mixed_precision, mode=args.mode, lr=args.lr,
                        log_every=args.log_every, losses=our_losses)
        cached_losses: list[float] = []
        cached = None
        if args.cache_vision_features:
            cached = ours(model_dir, root / "data", root / "out-cached", args.steps, args.batch_size, device=device,
                          mixed_precision=args.mixed_precision, mode=args.mode, lr=args.lr,
                          log_every=args.log_every, losses=cached_losses, cache_vision_features=True)
    print(f"device: {device}, threads: {torch.get_num_threads()}, steps: {args.steps}, batch size: "
          f"{args.batch_size}, mode: {args.mode}, mixed precision: {args.mixed_precision}, lr: {args.lr}")
    if reference is not None:
        print(f"plain loop:      {reference:8.1f} samples/s  (loss {plain_losses[0]:.3f} → {plain_losses[-1]:.3f})")
    else:
        print("plain loop:      skipped (mode qlora)")
    trend = f"loss {our_losses[0]:.3f} → {our_losses[-1]:.3f} over {len(our_losses)} logs" if our_losses else "no loss"
    print(f"train_captioner: {measured:8.1f} samples/s  ({trend})")
    if reference is not None:
        print(f"ratio (ours / plain): {measured / reference:.2f}")
    if cached is not None:
        epochs = args.steps * args.batch_size / args.images
        trend = f"loss {cached_losses[0]:.3f} → {cached_losses[-1]:.3f}" if cached_losses else "no loss"
        print(f"with cache_vision_features: {cached:8.1f} samples/s over {epochs:.1f} epochs ({trend})")
        print(f"ratio (cached / plain): {cached / reference:.2f}, (cached / ours): {cached / measured:.2f}")


if __name__ == "__main__":
    main()
