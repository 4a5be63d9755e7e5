"""Training throughput of ``train_tagger`` against a plain PyTorch/timm loop, per mode, in one run.

Why: the trainer adds a stratified split, per-epoch validation with mAP/F1 and thresholds,
checkpoints and exports; head-only training adds the feature cache. This shows what the
plumbing costs and what the cache saves. Modes:

* ``full``: the whole model trains (both loops).
* ``head``: the backbone is frozen (eval mode, no gradient), only the classifier trains; both
  loops run the backbone forward on every step.
* ``head+cache``: the trainer with ``model.cache_features`` (a fresh cache each round, so its
  filling pass is in the time) against the same plain head-only loop, which, like the
  scripts in the field, computes the features again every epoch.

The trainer's per-epoch work the plain loop skips stays in its time; what it saves is work
the plain loop repeats: without the cache, a frozen backbone's validation features are kept for
the frozen epochs (only the classifier runs again), and the weights of one step are written
once (OUTPUT/last links the best export made at that step). The load average is printed too.

Both loops decode the same generated PNGs with the same batch size, epochs, AdamW settings,
BCE loss, gradient clipping, threads and device, and both run a validation pass over the
same number of images every epoch. The time is the whole call, model build included, so the
trainer's checkpoints (``OUTPUT/last`` every epoch), exports and metrics are in it. Rounds
interleave the runs (plain, trainer, per mode) so a busy machine disturbs both alike; the
table gives the median samples/s (training images × epochs / seconds) and the ratio of medians.

On a machine shared with other jobs, ``--clock cpu`` times the process's CPU seconds (user +
system) instead of the wall clock: with ``--threads 1`` and loaders in the main process (both
loops here) that is the work each loop does, which neighbours disturb far less than the wall time.

    .venv/bin/python benchmarks/train_tagger_throughput.py [--rounds 3] [--epochs 4] [--backbone resnet10t]
        [--clock cpu]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from captionkit._torchvision_compat import ensure_torchvision

ensure_torchvision()

MODES = ("full", "head", "head+cache")
clock = time.perf_counter  # --clock cpu: time.process_time


class PlainImages:
    """What a plain script reads: PIL decode, bicubic resize, normalise, random mirror."""

    def __init__(self, items: list[tuple[Path, list[int]]], num_tags: int, size: int, mean: Any, std: Any,
                 hflip: bool) -> None:
        import numpy as np

        self.items, self.num_tags, self.size, self.hflip = items, num_tags, size, hflip
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import numpy as np
        import torch
        from PIL import Image

        path, rows = self.items[index]
        image = Image.open(path).convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        if self.hflip and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0 - self.mean) / self.std
        target = torch.zeros(self.num_tags)
        target[rows] = 1.0
        return torch.from_numpy(array), target


def read_items(data: Path) -> tuple[list[tuple[Path, list[int]]], int]:
    paths = sorted(data.glob("*.png"))
    tag_lists = [[tag.strip() for tag in path.with_suffix(".txt").read_text().split(",") if tag.strip()]
                 for path in paths]
    names = sorted({tag for tags in tag_lists for tag in tags})
    index = {name: row for row, name in enumerate(names)}
    return [(path, [index[tag] for tag in tags]) for path, tags in zip(paths, tag_lists, strict=True)], len(names)


def plain_loop(data: Path, mode: str, backbone: str, size: int, epochs: int, batch_size: int, lr: float,
               val_fraction: float, device: str) -> tuple[float, int]:
    """The reference loop; returns (seconds, training samples)."""
    import timm
    import torch

    start = clock()
    items, num_tags = read_items(data)
    order = random.Random(0).sample(range(len(items)), len(items))
    val_count = max(1, round(len(items) * val_fraction))
    val_items, train_items = [items[i] for i in order[:val_count]], [items[i] for i in order[val_count:]]
    model = timm.create_model(backbone, num_classes=num_tags).to(device)
    cfg = model.pretrained_cfg
    train_set = PlainImages(train_items, num_tags, size, cfg["mean"], cfg["std"], hflip=True)
    val_set = PlainImages(val_items, num_tags, size, cfg["mean"], cfg["std"], hflip=False)
    head_only = mode != "full"
    classifier = model.get_classifier()
    parameters = list(classifier.parameters()) if head_only else list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        if head_only:
            model.eval()
        else:
            model.train()
        for images, targets in torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True):
            images, targets = images.to(device), targets.to(device)
            if head_only:
                with torch.no_grad():
                    features = model.forward_head(model.forward_features(images), pre_logits=True)
                logits = classifier(features)
            else:
                logits = model(images)
            loss = loss_fn(logits, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.inference_mode():
            for images, targets in torch.utils.data.DataLoader(val_set, batch_size=batch_size):
                loss_fn(model(images.to(device)), targets.to(device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return clock() - start, len(train_items) * epochs


def ours(data: Path, output: Path, mode: str, backbone: str, size: int, epochs: int, batch_size: int, lr: float,
         val_fraction: float, device: str) -> tuple[float, int]:
    """``train_tagger`` with the same settings; returns (seconds, training samples)."""
    from captionkit.train.tagger import load_tagger_config, train_tagger

    settings = [f"output_dir={output}", f"data.train_dirs=[{data}]", f"model.backbone={backbone}",
                f"model.image_size={size}", f"epochs={epochs}", f"batch_size={batch_size}", f"optimizer.lr={lr}",
                "optimizer.warmup_fraction=0", "data.num_workers=0", "report_to=none",
                f"data.val_fraction={val_fraction}", "data.split=random", "save_every_epochs=0",
                f"device={'cpu' if device == 'cpu' else 'auto'}"]
    if mode != "full":
        settings.append("model.freeze_backbone=true")
    if mode == "head+cache":
        settings.append("model.cache_features=true")
    start = clock()
    result = train_tagger(load_tagger_config(None, settings))
    return clock() - start, (result.images_used - round(result.images_used * val_fraction)) * epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu or cuda")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed seconds; cpu: this process's CPU seconds (for a busy machine)")
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    import logging

    import torch

    from captionkit.train.tagger_synthetic import write_shapes_dataset

    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    modes = [mode for mode in args.modes.split(",") if mode]
    times: dict[tuple[str, str], list[float]] = {}
    common = {"backbone": args.backbone, "size": args.image_size, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "val_fraction": 0.2, "device": device}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = write_shapes_dataset(root / "data", args.images, seed=0, size=(args.image_size, args.image_size))
        plain_loop(data, "full", **{**common, "epochs": 1})  # warm-up: imports, allocator, kernels
        for round_index in range(args.rounds):
            for mode in modes:
                seconds, samples = plain_loop(data, mode, **common)
                times.setdefault((mode, "plain"), []).append(samples / seconds)
                seconds, samples = ours(data, root / f"out-{round_index}-{mode}", mode, **common)
                times.setdefault((mode, "ours"), []).append(samples / seconds)
                print(f"round {round_index + 1} {mode:10s} plain {times[(mode, 'plain')][-1]:8.1f}  train_tagger "
                      f"{times[(mode, 'ours')][-1]:8.1f} samples/s  ratio "
                      f"{times[(mode, 'ours')][-1] / times[(mode, 'plain')][-1]:.2f}", flush=True)
    load_after = os.getloadavg()
    print(f"\nload average (1 min) {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end "
          f"({os.cpu_count()} CPUs); the other jobs on this machine disturb the wall clock far more than --clock cpu")
    print(f"clock: {args.clock}, device: {device}, torch threads: {torch.get_num_threads()}, "
          f"backbone: {args.backbone} at "
          f"{args.image_size}px, {args.images} images (80% train), {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.rounds} interleaved rounds; medians:")
    print(f"{'mode':12s}{'plain samples/s':>17s}{'train_tagger':>14s}{'ratio':>8s}  per-round ratios")
    for mode in modes:
        plain, mine = times[(mode, "plain")], times[(mode, "ours")]
        rounds = ", ".join(f"{m / p:.2f}" for m, p in zip(mine, plain, strict=True))
        print(f"{mode:12s}{statistics.median(plain):17.1f}{statistics.median(mine):14.1f}"
              f"{statistics.median(mine) / statistics.median(plain):8.2f}  {rounds}")
    if "head" in modes and "head+cache" in modes:
        cached, uncached = times[("head+cache", "ours")], times[("head", "ours")]
        print(f"train_tagger head+cache / head (the cache alone): "
              f"{statistics.median(cached) / statistics.median(uncached):.2f}")


if __name__ == "__main__":
    main()
