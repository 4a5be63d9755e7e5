"""Training throughput of ``train_captioner`` against a plain PyTorch loop on the same model and data.

Why: the trainer adds token-normalised accumulation, deterministic sampling, logging and
checkpoint plumbing, and removes overhead the plain loop has (data workers, the fused AdamW
kernel, no per-step host reads); this shows the net effect. Both loops use the same tiny
Florence-2, the same generated shapes data set, batch size, optimizer settings, device,
precision and number of steps, with no validation or checkpoints in either.

Every mode in :data:`MODES` named by ``--modes`` runs in one invocation (default ``full,lora``;
``qlora`` needs CUDA and bitsandbytes and runs only the trainer, since a plain 4-bit loop would
be a second QLoRA implementation to keep in step). For each mode the plain loop and the
trainer alternate ``--repeats`` times (the first of each pair alternates too), so a machine
that speeds up or slows down during the run affects both alike. Printed per mode: samples/s
of each, the ratio (ours / plain; the median over repeats) and each loop's training loss at
its first and last step (the trainer's: its first and last logged window).

``--device`` picks where both loops run (the trainer through accelerate: ``cpu`` sets its
``cpu`` option, ``cuda`` needs a GPU); ``--mixed-precision`` is the trainer's option (the
plain loop uses the same autocast, with a gradient scaler for fp16).

    .venv/bin/python benchmarks/train_captioner_throughput.py [--modes full,lora] [--steps 60] [--repeats 3]
    python benchmarks/train_captioner_throughput.py --device cuda --mixed-precision bf16 --modes full,lora,qlora
    python benchmarks/train_captioner_throughput.py --modes lora,lora-cached --images 128 --steps 64
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captionkit._torchvision_compat import ensure_torchvision

ensure_torchvision()


@dataclass(frozen=True)
class Mode:
    """One benchmarked configuration: the trainer's ``mode``, its learning rate and any other
    trainer settings; ``plain`` False runs the trainer only."""

    mode: str
    lr: float
    settings: dict[str, Any] = field(default_factory=dict)
    plain: bool = True
    cuda_only: bool = False


MODES: dict[str, Mode] = {
    "full": Mode("full", 1e-4),
    "lora": Mode("lora", 1e-3),
    "qlora": Mode("qlora", 1e-3, plain=False, cuda_only=True),
    # LoRA training from stored vision features (the plain loop: LoRA re-encoding every image). Each run
    # starts with an empty cache in its own output folder: its first epoch computes and stores the
    # features, so use few images and enough steps for several epochs (--images 128 --steps 64).
    "lora-cached": Mode("lora", 1e-3, settings={"cache_vision_features": True}),
}


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
            losses.append(float(loss.detach()))  # waits for the device, as a plain loop's progress print does
    return steps * batch_size / (time.perf_counter() - start)


def ours(model_dir: Path, data_dir: Path, output: Path, steps: int, batch_size: int, device: str = "cpu",
         mixed_precision: str = "no", mode: str = "full", lr: float = 1e-4, log_every: int = 10,
         losses: list[float] | None = None, settings: dict[str, Any] | None = None) -> float:
    """``train_captioner`` with the same settings (samples/s); its logged losses go to ``losses``.

    ``settings``: further trainer config fields (a mode's own, e.g. ``num_workers``).
    """
    from captionkit.train.captioner import CaptionerTrainConfig, OptimizerSettings, SchedulerSettings, train_captioner
    from captionkit.train.captioner_data import DatasetSpec

    config = CaptionerTrainConfig(
        model=str(model_dir), output_dir=output, data=[DatasetSpec(path=data_dir)], batch_size=batch_size,
        max_steps=steps, max_target_tokens=32, optimizer=OptimizerSettings(lr=lr),
        scheduler=SchedulerSettings(name="constant"), report_to=[], log_every_steps=log_every,
        mode=mode, mixed_precision=mixed_precision, cpu=device == "cpu", **(settings or {}),
    )
    result = train_captioner(config)
    if losses is not None:
        metrics = output / "metrics.jsonl"
        for line in metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []:
            row = json.loads(line)
            if "train/loss" in row:
                losses.append(float(row["train/loss"]))
    return result.samples_per_second


def losses_text(losses: list[float], unit: str) -> str:
    return f"loss {losses[0]:.3f} → {losses[-1]:.3f} over {len(losses)} {unit}" if losses else "no loss"


def run_mode(name: str, spec: Mode, args: argparse.Namespace, device: str, model_dir: Path, pairs: list,
             data_dir: Path, work: Path) -> None:
    """Plain loop and trainer alternately, ``args.repeats`` times; prints one block for the mode."""
    lr = args.lr if args.lr is not None else spec.lr
    options = {"device": device, "mixed_precision": args.mixed_precision, "mode": spec.mode, "lr": lr}
    plain_rates: list[float] = []
    our_rates: list[float] = []
    plain_losses: list[float] = []
    our_losses: list[float] = []
    if spec.plain:
        plain_loop(model_dir, pairs, 3, args.batch_size, **options)  # warm-up (allocator, kernels)
    for repeat in range(args.repeats):
        order = ["plain", "ours"] if repeat % 2 == 0 else ["ours", "plain"]
        for which in order:
            if which == "plain" and spec.plain:
                plain_losses.clear()
                plain_rates.append(plain_loop(model_dir, pairs, args.steps, args.batch_size, losses=plain_losses,
                                              **options))
            elif which == "ours":
                our_losses.clear()
                our_rates.append(ours(model_dir, data_dir, work / f"{name}-{repeat}", args.steps, args.batch_size,
                                      log_every=args.log_every, losses=our_losses, settings=spec.settings,
                                      **options))
    print(f"[{name}] mode {spec.mode}, lr {lr}" + (f", {spec.settings}" if spec.settings else ""))
    if plain_rates:
        rates = ", ".join(f"{rate:.1f}" for rate in plain_rates)
        print(f"  plain loop:      {statistics.median(plain_rates):8.1f} samples/s  ({rates}; "
              f"{losses_text(plain_losses, 'steps')})")
    else:
        print("  plain loop:      skipped (the trainer only, see the module doc)")
    rates = ", ".join(f"{rate:.1f}" for rate in our_rates)
    print(f"  train_captioner: {statistics.median(our_rates):8.1f} samples/s  ({rates}; "
          f"{losses_text(our_losses, 'logs')})")
    if plain_rates:
        ratios = [ours_rate / plain_rate for ours_rate, plain_rate in zip(our_rates, plain_rates, strict=True)]
        each = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        print(f"  ratio (ours / plain): {statistics.median(ratios):.2f}" + (f"  (each repeat: {each})"
                                                                             if len(ratios) > 1 else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="full,lora", help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="plain/trainer pairs per mode (median reported)")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu or cuda")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--lr", type=float, default=None, help="every mode's learning rate (default: the mode's)")
    parser.add_argument("--log-every", type=int, default=10, help="trainer log interval (its loss points)")
    args = parser.parse_args()
    names = [name.strip() for name in args.modes.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODES]
    if unknown or not names or args.repeats < 1:
        parser.error(f"--modes: unknown {unknown}, choose from {', '.join(MODES)}" if unknown or not names
                     else "--repeats must be at least 1")

    import torch

    from captionkit.testing import build_tiny_florence2
    from captionkit.train.captioner_data import write_shapes_dataset

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no GPU")
    card = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"device: {device} ({card}), threads: {torch.get_num_threads()}, steps: {args.steps}, batch size: "
          f"{args.batch_size}, mixed precision: {args.mixed_precision}, repeats: {args.repeats}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        pairs = write_shapes_dataset(root / "data", args.images, seed=0)
        model_dir = build_tiny_florence2(root / "model", init_std=0.2)
        for name in names:
            spec = MODES[name]
            if spec.cuda_only and not device.startswith("cuda"):
                print(f"[{name}] skipped: needs a CUDA device")
                continue
            torch.manual_seed(0)
            run_mode(name, spec, args, device, model_dir, pairs, root / "data", root / "out")


if __name__ == "__main__":
    main()
