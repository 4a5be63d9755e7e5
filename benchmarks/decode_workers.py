"""Decode workers chosen by measurement (the default) against every fixed ``--workers`` in the same run.

Why: the default count must never be more than 5% slower than the best fixed setting on the
machine at hand (issue 19, item 3). Each case captions the same JPEGs with a random Florence-2
(``tiny``: decode-bound; ``--image-size`` larger or ``--size base``: model-bound), once per
setting, settings interleaved and rotated over ``--repeats`` rounds so that load from other jobs
hits all of them alike; the median images/s per setting is compared with the best fixed one.

    python benchmarks/decode_workers.py --images 192 --repeats 3
    python benchmarks/decode_workers.py --size base --images 256 --batch-size 32 --device cuda --fixed 2 4 8 12
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from caption_throughput import make_images  # this folder is on sys.path when the script runs

from captionkit._torchvision_compat import ensure_torchvision


def one(model: Path, images: Path, out: Path, workers: int | None, args: argparse.Namespace) -> tuple[float, int]:
    """One run; (images/s over the processing time, the decode workers it ended with)."""
    import captionkit

    shutil.rmtree(out, ignore_errors=True)
    summary = captionkit.caption(images, model=str(model), batch_size=args.batch_size, workers=workers,
                                 output_dir=out, progress="quiet", max_new_tokens=args.max_new_tokens, num_beams=1,
                                 device=args.device, dtype=args.dtype)
    assert summary.failed == 0 and summary.processed > 0, summary.errors
    return summary.images_per_s, summary.decode_workers or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny")
    parser.add_argument("--image-size", type=int, nargs="+", default=[64, 512],
                        help="model input sizes for --size tiny, one case each (64: decode-bound)")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--source-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--fixed", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    ensure_torchvision()
    import logging

    import torch

    from captionkit.core.thread_tuning import decode_worker_limit
    from captionkit.testing import build_florence2_base_sized, build_tiny_florence2

    choices = logging.getLogger("captionkit.core.thread_tuning")  # the choice, once per run
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("    %(message)s"))
    choices.addHandler(handler)
    choices.setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="captionkit-decode-workers-"))
    try:
        images = work / "images"
        make_images(images, args.images, args.source_size)
        cases = [("base", None)] if args.size == "base" else [(f"tiny-{side}", side) for side in args.image_size]
        print(f"{args.images} JPEGs of {args.source_size}², batch {args.batch_size}, device {args.device}, "
              f"{decode_worker_limit()} CPUs for decoding, {torch.get_num_threads()} torch threads; "
              f"{args.repeats} interleaved rounds, medians", flush=True)
        for name, side in cases:
            model = work / f"model-{name}"
            if side is None:
                build_florence2_base_sized(model)
            else:
                build_tiny_florence2(model, image_size=side)
            settings: list[int | None] = [None, *args.fixed]
            rates: dict[int | None, list[float]] = {setting: [] for setting in settings}
            chosen: list[int] = []
            one(model, images, work / "warm", 2, args)  # imports, caches, allocator
            for round_number in range(args.repeats):
                shift = round_number % len(settings)
                for setting in settings[shift:] + settings[:shift]:
                    rate, workers = one(model, images, work / "out", setting, args)
                    rates[setting].append(rate)
                    if setting is None:
                        chosen.append(workers)
            medians = {setting: statistics.median(values) for setting, values in rates.items()}
            tops = {setting: max(values) for setting, values in rates.items()}  # the least disturbed run
            best = max(args.fixed, key=lambda setting: medians[setting])
            top = max(args.fixed, key=lambda setting: tops[setting])
            print(f"\n== {name}: images/s, median and best of {args.repeats} (each run's figures in brackets)")
            for setting in settings:
                label = f"chosen ({', '.join(map(str, chosen))})" if setting is None else f"fixed {setting}"
                print(f"  {label:22} median {medians[setting]:8.2f} ({medians[setting] / medians[best]:.3f} of the "
                      f"best fixed)  best {tops[setting]:8.2f} ({tops[setting] / tops[top]:.3f})  ["
                      f"{', '.join(f'{value:.1f}' for value in rates[setting])}]")
            for kind, values, reference in (("medians", medians, best), ("best runs", tops, top)):
                ratio = values[None] / values[reference]
                print(f"  {name} ({kind}): chosen/best fixed ({reference}) = {ratio:.3f} -> "
                      f"{'OK (within 5%)' if ratio >= 0.95 else 'SLOWER than the best fixed by more than 5%'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
