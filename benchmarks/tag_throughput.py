"""Tagging throughput: the `captionkit tag` pipeline vs a plain one-image-at-a-time loop.

The reference loop is what most tagger scripts do: open an image, preprocess it, run
the model on a batch of one, repeat. The pipeline is `captionkit.tag` itself: decode
and preprocess ahead in threads (large JPEGs at a reduced DCT scale), whole batches
through the model, every score into the store. Same model, same images, one process.

    python benchmarks/tag_throughput.py                       # random convnext_atto, 224 px
    python benchmarks/tag_throughput.py --model path/to/wd-tagger --images 256 --device cuda
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
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
    """Open → preprocess → predict, one image at a time, as the seed tagger scripts do."""
    from PIL import Image

    rows = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        rows.append(tagger.predict(tagger.preprocess(image)[None])[0])
    return np.stack(rows)


def pipeline(model_path: str, folder: Path, out: Path, batch_size: int, workers: int, device: str):
    """The real `captionkit tag` pipeline (threaded decode ahead, scaled JPEG decode, store), no files."""
    import captionkit
    from captionkit.core.store import Store
    from captionkit.steps.tagger import decode_scores

    summary = captionkit.tag(folder, model=model_path, batch_size=batch_size, workers=workers, device=device,
                             output_dir=out, write_sidecars=False, recursive=False)
    assert summary.failed == 0, summary.errors
    with Store(out) as store:
        scores = np.stack([decode_scores(result.raw["scores"]) for result in store.iter_results("tags")])
    return summary, scores


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
        tagger.unload()
        summary, scores = pipeline(model_path, folder, folder / "out", args.batch_size, args.workers, args.device)
        rate = summary.processed / summary.processing_s
        difference = float(np.abs(reference - scores).max())
        print(f"{'captionkit tag pipeline':38s}: {rate:8.1f} images/s  (model busy "
              f"{summary.model_busy_fraction:.0%}; max score difference vs reference {difference:.1e}, "
              "from scaled JPEG decode)")
        print(f"ratio pipeline/reference: {rate / reference_rate:.2f}x")


if __name__ == "__main__":
    main()
