"""Tagging throughput: batched TaggerModel with threaded decode+preprocess vs a plain loop.

The reference loop is what most tagger scripts do: open an image, preprocess it, run
the model on a batch of one, repeat. The batched path decodes and preprocesses in a
thread pool (PIL and numpy release the GIL) while the model runs whole batches. Both
use the same model and images; the script checks they give the same scores.

    python benchmarks/tag_throughput.py                       # random convnext_atto, 224 px
    python benchmarks/tag_throughput.py --model path/to/wd-tagger --images 256 --device cuda
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def build_model_folder(folder: Path, backbone: str, size: int, num_tags: int) -> Path:
    """A random-weight tagger folder in our export format (no download needed)."""
    from captionkit._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    import timm
    import torch

    from captionkit.train.tagger import preprocessing_for
    from captionkit.train.tagger_data import Vocabulary
    from captionkit.train.tagger_export import export_tagger

    torch.manual_seed(0)
    model = timm.create_model(backbone, num_classes=num_tags).eval()
    vocabulary = Vocabulary([f"tag_{i}" for i in range(num_tags)], [0] * num_tags, [1] * num_tags)
    return export_tagger(model, folder / "tagger", architecture=backbone, model_args={}, vocabulary=vocabulary,
                         preprocessing=preprocessing_for(model, size))


def write_images(folder: Path, count: int) -> list[Path]:
    """JPEGs of mixed sizes and aspect ratios, like a real dataset folder."""
    from captionkit.train.tagger_synthetic import make_shapes_image

    rng = random.Random(0)
    sizes = [(768, 512), (512, 768), (640, 640), (1024, 576), (600, 800)]
    paths = []
    for index in range(count):
        image, _ = make_shapes_image(rng, sizes[index % len(sizes)])
        path = folder / f"{index:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def reference_loop(tagger, paths: list[Path]) -> np.ndarray:
    """Open → preprocess → predict, one image at a time."""
    from captionkit.images import load_image

    rows = []
    for path in paths:
        image = load_image(path).image
        rows.append(tagger.predict(tagger.preprocess(image)[None])[0])
    return np.stack(rows)


def batched(tagger, paths: list[Path], batch_size: int, workers: int, scaled_decode: bool) -> np.ndarray:
    """Decode + preprocess in a thread pool (in order, bounded look-ahead); predict whole batches.

    ``scaled_decode`` lets the image loader decode large JPEGs at a reduced DCT scale that
    is still at least the model's input size (its own speed-up, separate from batching).
    """
    from captionkit.images import load_image

    size = tagger.preprocessing.size
    target = (size[1], size[0]) if scaled_decode else None

    def prepare(path: Path) -> np.ndarray:
        return tagger.preprocess(load_image(path, target_size=target).image)

    def inputs() -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            window = batch_size * 2
            futures = [pool.submit(prepare, path) for path in paths[:window]]
            for next_index in range(window, len(paths) + window):
                yield futures.pop(0).result()
                if next_index < len(paths):
                    futures.append(pool.submit(prepare, paths[next_index]))
                if not futures:
                    return

    rows, pending = [], []
    for array in inputs():
        pending.append(array)
        if len(pending) == batch_size:
            rows.append(tagger.predict(np.stack(pending)))
            pending = []
    if pending:
        rows.append(tagger.predict(np.stack(pending)))
    return np.concatenate(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a tagger folder or model.onnx (default: a random convnext_atto)")
    parser.add_argument("--backbone", default="convnext_atto", help="timm backbone for the random model")
    parser.add_argument("--size", type=int, default=224, help="input size of the random model")
    parser.add_argument("--tags", type=int, default=1000, help="tags of the random model")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from captionkit.models.taggers import load_tagger

    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        model_path = args.model or str(build_model_folder(folder, args.backbone, args.size, args.tags))
        paths = write_images(folder, args.images)
        tagger = load_tagger(model_path, device=args.device)
        print(f"model: {tagger.format} {model_path} ({len(tagger.tags)} tags, input {tagger.preprocessing.size}) "
              f"on {tagger.device}; {len(paths)} JPEGs; batch {args.batch_size}, {args.workers} threads")
        reference_loop(tagger, paths[:4])  # warm-up (allocator, kernels)
        started = time.perf_counter()
        reference = reference_loop(tagger, paths)
        reference_seconds = time.perf_counter() - started
        reference_rate = len(paths) / reference_seconds
        print(f"{'reference loop (1 image per call)':38s}: {reference_rate:8.1f} images/s")
        for scaled in (False, True):
            started = time.perf_counter()
            scores = batched(tagger, paths, args.batch_size, args.workers, scaled_decode=scaled)
            rate = len(paths) / (time.perf_counter() - started)
            difference = float(np.abs(reference - scores).max())
            label = "batched + threads" + (" + scaled JPEG decode" if scaled else "")
            print(f"{label:38s}: {rate:8.1f} images/s  {rate / reference_rate:5.2f}x  "
                  f"(max score difference vs reference {difference:.1e})")


if __name__ == "__main__":
    main()
