"""`captionkit inspect` throughput: images/s at each depth of image check, extrapolated to 100,000 images.

Generates a folder of JPEGs in a few realistic shapes with captions (20-70 words) and
tag files (Zipf-distributed tags), then inspects it four ways:

* header-only + store hashes: sizes from headers, content hashes from the captionkit store
  (no image byte is read past the header), as after `captionkit caption`
* header-only: sizes from headers, content hashes from the file bytes (``--no-near-duplicates``)
* default: header + perceptual hash from a reduced (1/8 scale DCT) JPEG decode
* full: every image decoded by the core's ``load_image`` (``--full``)

Each includes the caption checks (CLIP BPE token counts, loops, refusals, ...) and tag
checks. The tokenizer's one-time load (it imports torch) is measured separately.

    python benchmarks/inspect_throughput.py                      # 2000 images of ~512 px
    python benchmarks/inspect_throughput.py --images 5000 --side 1024 --workers 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("a woman man girl boy cat dog standing sitting walking in on the with of near under red blue green black "
         "white golden long short hair dress coat hat street forest beach city room window light shadow evening "
         "morning soft bright dark detailed photo painting portrait landscape close-up wide view background").split()
SHAPES = [(1.0, 1.0), (1.5, 1.0), (1.0, 1.5), (16 / 9, 1.0), (4 / 3, 1.0), (3 / 4, 1.0)]


def generate(folder: Path, count: int, side: int, seed: int = 0) -> None:
    """``count`` JPEGs (smooth random pictures, a few aspect ratios), captions and tag files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tags = [f"tag_{i}" for i in range(400)]
    weights = 1.0 / np.arange(1, len(tags) + 1)
    weights /= weights.sum()
    for index in range(count):  # a random 8x8 picture, upsampled: fast, smooth, each distinct
        width_ratio, height_ratio = SHAPES[index % len(SHAPES)]
        scale = side / max(width_ratio, height_ratio)
        size = (int(width_ratio * scale) // 8 * 8, int(height_ratio * scale) // 8 * 8)
        small = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        small.resize(size, Image.Resampling.BICUBIC).save(folder / f"{index:06d}.jpg", quality=85)
        words = rng.choice(WORDS, size=int(rng.integers(20, 70)))
        (folder / f"{index:06d}.txt").write_text("ohwx, " + " ".join(words), encoding="utf-8")
        chosen = rng.choice(len(tags), size=int(rng.integers(5, 20)), replace=False, p=weights)
        (folder / f"{index:06d}.tags").write_text(", ".join(tags[i] for i in chosen), encoding="utf-8")


def write_store(folder: Path) -> None:
    """What `captionkit caption` leaves: a store with each image's signature and content hash."""
    import hashlib

    from captionkit.core.store import Result, Store, file_signature

    with Store(folder) as store:
        results = []
        for path in sorted(folder.glob("*.jpg")):
            digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
            results.append(Result("caption", path.name, str(path), file_signature(path), digest, "fp", {}, "ok",
                                  None, (folder / f"{path.stem}.txt").read_text(encoding="utf-8"), None, [], 0.0))
        store.put_results(results)


def run(folder: Path, workers: int, **options) -> tuple[float, object]:
    from captionkit.inspection import inspect_dataset

    started = time.perf_counter()
    report = inspect_dataset(folder, trigger="ohwx", tag_ext=".tags", workers=workers, progress="quiet", **options)
    return time.perf_counter() - started, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=512, help="Longest side of the generated images.")
    parser.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2))
    parser.add_argument("--folder", type=Path, help="Keep the generated data set here (default: a temp folder).")
    parser.add_argument("--json", type=Path, help="Write the numbers here.")
    args = parser.parse_args()

    temp = None
    if args.folder is None:
        temp = tempfile.mkdtemp(prefix="ck-inspect-bench-")
        folder = Path(temp) / "data"
    else:
        folder = args.folder
    try:
        started = time.perf_counter()
        if not any(folder.glob("*.jpg")):
            generate(folder, args.images, args.side)
        print(f"generated {args.images} images ({args.side} px) in {time.perf_counter() - started:.1f}s: {folder}")

        store_folder = folder.parent / "with-store"
        if not store_folder.exists():
            shutil.copytree(folder, store_folder)
            write_store(store_folder)
        os.sync()  # no writeback of the generated files competes with the measured reads

        started = time.perf_counter()
        from captionkit._torchvision_compat import ensure_torchvision

        ensure_torchvision()
        from captionkit.core.tokens import clip_token_count

        clip_token_count("warm up")
        load_s = time.perf_counter() - started
        print(f"CLIP tokenizer load (torch import, once per process): {load_s:.1f}s")

        results = {"images": args.images, "side": args.side, "workers": args.workers, "cpus": os.cpu_count(),
                   "tokenizer_load_s": round(load_s, 2), "modes": {}}
        modes = [
            ("header-only + store hashes", store_folder, {"near_duplicates": False}),
            ("header-only", folder, {"near_duplicates": False}),
            ("default (headers + perceptual hash)", folder, {}),
            ("full decode", folder, {"full": True}),
        ]
        for target in (folder, store_folder):  # warm the page cache (both copies) and the tokenizer's caches
            run(target, args.workers, near_duplicates=False)
        print(f"{'mode':38} {'seconds':>8} {'images/s':>9} {'100k images':>12}  findings")
        for name, target, options in modes:
            elapsed, report = run(target, args.workers, **options)
            rate = args.images / elapsed
            extrapolated = 100_000 / rate + load_s
            summary = {kind: count for kind, count in report.summary().items() if count}
            results["modes"][name] = {"seconds": round(elapsed, 2), "images_per_s": round(rate, 1),
                                      "extrapolated_100k_s": round(extrapolated, 1), "findings": summary}
            print(f"{name:38} {elapsed:8.2f} {rate:9.0f} {extrapolated / 60:9.1f} min  {len(report.findings)}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
            print(f"wrote {args.json}")
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
