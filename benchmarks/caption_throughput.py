"""Captioning throughput: captionkit's pipeline vs the seed scripts' plain loop vs pure decoding.

All three run in one process on the same images and the same model, so the ratios are
fair. ``--size tiny`` (a ~0.3M-parameter random Florence-2, 64 px input unless
``--image-size`` says otherwise) is overhead-bound: decoding 1024² JPEGs dominates. ``--size base`` (random weights with
Florence-2-base's shapes, 231M parameters) is compute-bound.

``--device``, ``--dtype`` and ``--attn-implementation`` apply to both the reference loop and
the pipeline (``auto``: a GPU when there is one, bf16/fp16 there, fp32 on a CPU), so the ratio
compares like with like on a GPU too.

    python benchmarks/caption_throughput.py --size tiny --images 96
    python benchmarks/caption_throughput.py --size base --images 16 --batch-size 4
    python benchmarks/caption_throughput.py --size base --images 512 --batch-size 32 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captionkit._torchvision_compat import ensure_torchvision


def photo(rng: np.random.Generator, size: int) -> Image.Image:
    """One photo-like image (smooth gradients + ellipses), ``size``² pixels; the benchmarks share it."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = np.stack([np.add.outer(ramp * rng.random(), ramp * rng.random()) / 2 for _ in range(3)], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, size - size // 4, 2)
        draw.ellipse([x, y, x + size // 5, y + size // 6], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    """Photo-like JPEGs (smooth gradients + shapes), ``size``² pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"photo{index:04d}.jpg"
        photo(rng, size).save(path, quality=90)
        paths.append(path)
    return paths


def reference_loop(model_folder: Path, paths: list[Path], batch_size: int, generate: dict, device: str = "cpu",
                   dtype: str = "fp32", attn_implementation: str = "sdpa",
                   captions: list[str] | None = None) -> float:
    """decode → processor → generate, batch by batch, all on one thread (as the seed scripts do).

    The model runs on ``device`` in ``dtype`` (names as captionkit's ``--dtype``); on a GPU one
    untimed warm-up batch goes first. Parsed captions are appended to ``captions`` if given.
    """
    import torch
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from captionkit.models.florence2 import resolve_dtype

    torch_dtype = resolve_dtype(dtype, device, warn=False)
    processor = AutoProcessor.from_pretrained(model_folder)
    model = Florence2ForConditionalGeneration.from_pretrained(
        model_folder, dtype=torch_dtype, attn_implementation=attn_implementation).to(device).eval()

    def run(chunk: list[Path], timings: dict[str, float]) -> list[str]:
        mark = time.perf_counter()
        images = [Image.open(path).convert("RGB") for path in chunk]
        timings["decode"] += time.perf_counter() - mark
        mark = time.perf_counter()
        inputs = processor(text=["<CAPTION>"] * len(images), images=images, return_tensors="pt")
        inputs = {key: value.to(device) for key, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        timings["processor"] += time.perf_counter() - mark
        mark = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**inputs, **generate)
        texts = processor.batch_decode(output, skip_special_tokens=False)  # waits for the GPU
        timings["generate"] += time.perf_counter() - mark
        parsed = [processor.post_process_generation(text, task="<CAPTION>", image_size=image.size)
                  for text, image in zip(texts, images, strict=True)]
        return [str(result.get("<CAPTION>", result)) for result in parsed]

    if device != "cpu":
        run(paths[:batch_size], {"decode": 0.0, "processor": 0.0, "generate": 0.0})  # kernels, allocator
    timings = {"decode": 0.0, "processor": 0.0, "generate": 0.0}
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        texts = run(paths[start : start + batch_size], timings)
        if captions is not None:
            captions.extend(texts)
    elapsed = time.perf_counter() - started
    print("reference time split: " + ", ".join(f"{k} {v / elapsed:.0%}" for k, v in timings.items()))
    return len(paths) / elapsed


def decode_only(model_folder: Path, paths: list[Path], workers: int) -> float:
    """captionkit's decode + preprocess alone, in the same worker pool: the ceiling for the pipeline."""
    from transformers import AutoProcessor

    from captionkit.core.images import load_image

    processor = AutoProcessor.from_pretrained(model_folder)
    size = processor.image_processor.size
    target = (size["width"], size["height"])

    def work(path: Path):
        loaded = load_image(path, target_size=target)
        return processor.image_processor(images=[loaded.image], return_tensors="pt")["pixel_values"]

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, paths))
    return len(paths) / (time.perf_counter() - started)


def pipeline(model_folder: Path, folder: Path, batch_size: int, workers: int, generate: dict, out: Path,
             device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa"):
    """``captionkit.caption`` over ``folder`` (results into ``out``); returns its RunSummary."""
    import captionkit

    summary = captionkit.caption(
        folder, model=str(model_folder), batch_size=batch_size, workers=workers, output_dir=out,
        progress="quiet", max_new_tokens=generate["max_new_tokens"], num_beams=generate["num_beams"],
        device=device, dtype=dtype, attn_implementation=attn_implementation,
    )
    assert summary.failed == 0 and summary.processed > 0, summary.errors
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--source-size", type=int, default=1024, help="pixels per side of the generated JPEGs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=64, help="model input size for --size tiny")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (both loops)")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16 (both loops)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    args = parser.parse_args()
    ensure_torchvision()
    import torch

    from captionkit.models.florence2 import resolve_device
    from captionkit.testing import build_florence2_base_sized, build_tiny_florence2

    device = resolve_device(args.device)

    work = Path(tempfile.mkdtemp(prefix="captionkit-bench-"))
    try:
        model_folder = work / "model"
        if args.size == "base":
            build_florence2_base_sized(model_folder)
        else:
            build_tiny_florence2(model_folder, image_size=args.image_size)
        paths = make_images(work / "images", args.images, args.source_size)
        generate = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": False}
        print(f"machine: {torch.get_num_threads()} torch threads, cuda={torch.cuda.is_available()}; "
              f"model={args.size}; {args.images} JPEGs of {args.source_size}²; batch {args.batch_size}; "
              f"workers {args.workers}; max_new_tokens {args.max_new_tokens}; beams {args.num_beams}; "
              f"device {device}; dtype {args.dtype}; attention {args.attn_implementation}")
        decode_rate = decode_only(model_folder, paths, args.workers)
        reference_rate = reference_loop(model_folder, paths, args.batch_size, generate, device=device,
                                        dtype=args.dtype, attn_implementation=args.attn_implementation)
        summary = pipeline(model_folder, work / "images", args.batch_size, args.workers, generate, work / "out",
                           device=device, dtype=args.dtype, attn_implementation=args.attn_implementation)
        pipeline_rate = summary.processed / summary.processing_s
        print(f"decode+preprocess only : {decode_rate:8.2f} images/s")
        print(f"reference loop         : {reference_rate:8.2f} images/s")
        overall = summary.processed / (summary.elapsed_s - summary.model_load_s)
        print(f"captionkit pipeline    : {pipeline_rate:8.2f} images/s "
              f"(model busy {summary.model_busy_fraction:.0%}; incl. planning+store {overall:.2f}/s; "
              f"model CPU threads chosen: {summary.model_cpu_threads})")
        print(f"ratio pipeline/reference: {pipeline_rate / reference_rate:.2f}x")
        print(f"ratio pipeline/decode   : {pipeline_rate / decode_rate:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
