"""Executor overhead: the same tiny-model captioning run on the local executor, on Ray, and with --devices.

Every run is a fresh process (so torch threads, imports and Ray start the same way each
time) over the same JPEG folder with a ~0.3M-parameter random Florence-2, writing into its
own output folder. The model costs almost nothing, so what is measured is the executors'
own cost: decode and preprocess, scheduling, moving prepared tensors, committing to the store.

Reported per mode (median of the runs, the modes interleaved round by round so that load from
other jobs hits them alike): wall time of the process (imports, Ray start or worker spawn, model
load, the run), time to the first committed batch, steady images/s (images committed after the
first commit / time after it), the model's busy fraction (model seconds / run seconds, per Ray
actor or device worker), the decode workers used, and the ratios to the first mode (the overhead
ratio: wall this/local, steady this/local). Also measured once, for docs/scaling.md: the CPU time of
``prepare`` (decode + preprocess) per image at this size and at 1024², and the driver's
commit cost per image (store transaction + sidecar write), which bounds what one driver feeds.

    python benchmarks/executor_overhead.py --images 300 --repeats 3
    python benchmarks/executor_overhead.py --modes local ray --images 100 --repeats 1
    python benchmarks/executor_overhead.py --size base --device cuda --modes local ray --images 384 \
        --batch-size 32 --image-size 1024   # on a GPU: Florence-2-base shapes, is the model kept busy?
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {  # the first is the reference: one torch thread for the model, as each Ray actor and device worker has
    "local-1-thread": {"env": {"OMP_NUM_THREADS": "1"}, "options": {}},
    "local": {"env": {}, "options": {}},
    "ray": {"env": {}, "options": {"executor": "ray", "ray_actors": 1, "ray_cpus_per_actor": 1.0}},
    "devices-cpu,cpu": {"env": {}, "options": {"devices": "cpu,cpu"}},
    "devices-cuda:0": {"env": {}, "options": {"devices": "cuda:0"}},  # one device worker: is its model kept busy?
}


def make_images(folder: Path, count: int, size: int) -> None:
    import numpy as np
    from caption_throughput import photo  # this folder is on sys.path when the script runs

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        photo(rng, size).save(folder / f"photo{index:05d}.jpg", quality=90)


def one_run(model: str, images: str, output: str, mode: str, batch_size: int, workers: int | None,
            device: str = "auto") -> None:
    """In a fresh process: one captioning run; prints its summary as JSON."""
    import captionkit

    marks: list[tuple[float, int]] = []  # (time, images saved) at every commit

    def listen(event: dict) -> None:
        if event["event"] == "progress":
            marks.append((time.perf_counter(), event["done"] + event["failed"]))

    started = time.perf_counter()
    summary = captionkit.caption(images, model=model, output_dir=output, batch_size=batch_size, workers=workers,
                                 max_new_tokens=12, num_beams=1, progress="quiet", listener=listen, device=device,
                                 **MODES[mode]["options"])
    (first, first_done), (last, last_done) = marks[0], marks[-1]
    steady = (last_done - first_done) / (last - first) if last > first else float("nan")
    print(json.dumps({**summary.as_dict(), "first_result_s": first - started, "steady_images_per_s": steady}))


def prepare_cost(model: str, folder: Path, count: int = 40, side: int | None = None) -> float:
    """CPU seconds of ``step.prepare`` (decode + preprocess) per image, one thread.

    ``side``: preprocess to this square input instead of the tiny model's 64² (768 is Florence-2's).
    """
    from captionkit.core.records import Record
    from captionkit.models.florence2 import Florence2Captioner
    from captionkit.steps.captioner import CaptionStep

    step = CaptionStep(Florence2Captioner(model=model))
    step.load_preprocessing()
    if side is not None:
        step.captioner.processor.image_processor.size = {"height": side, "width": side}
        step._target_size = (side, side)
    paths = sorted(folder.glob("*.jpg"))[:count]
    step.prepare(Record(paths[0].name, paths[0]))  # warm up
    started = time.process_time()
    for path in paths:
        step.prepare(Record(path.name, path))
    return (time.process_time() - started) / len(paths)


def tagger_prepare_cost(folder: Path, side: int = 448) -> float:
    """CPU seconds per image of a tagger's prepare: decode (at a reduced scale) + pad, resize, normalise to side²."""
    from captionkit.core.images import load_image
    from captionkit.models.taggers import Preprocessing

    preprocessing = Preprocessing(size=(side, side))
    paths = sorted(folder.glob("*.jpg"))
    preprocessing(load_image(paths[0], target_size=(side, side)).image)  # warm up
    started = time.process_time()
    for path in paths:
        preprocessing(load_image(path, target_size=(side, side)).image)
    return (time.process_time() - started) / len(paths)


def commit_cost(folder: Path, count: int = 2000, batch: int = 32, sidecars: bool = True) -> float:
    """Driver seconds per image to commit results (one store transaction per batch) and write their sidecars."""
    from captionkit.core.records import Record
    from captionkit.core.sinks import SidecarSink
    from captionkit.core.store import Store
    from captionkit.executors.local import LocalExecutor, RunSummary
    from captionkit.steps.base import Prepared

    class Step:
        field = "caption"
        batch_size = batch

        @staticmethod
        def render(raw):
            return raw["text"]

    records = [Record(f"image{index:06d}.jpg", folder / f"image{index:06d}.jpg") for index in range(count)]
    executor = LocalExecutor()
    executor._record_settings = {}
    with Store(folder) as store:
        sink = SidecarSink(store, "caption") if sidecars else None
        if sink is not None:
            sink.plan(records)
        summary = RunSummary(field="caption")
        started = time.perf_counter()
        for start in range(0, count, batch):
            chunk = records[start:start + batch]
            items = [Prepared(record, None, (768, 768), "0" * 16) for record in chunk]
            outcomes = [(True, {"text": f"a photo of thing number {start + index}"}) for index in range(len(chunk))]
            executor._save(Step(), items, outcomes, [], store, sink, summary, {"model": "x"}, "f" * 20, {})
        return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: chosen by measurement)")
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny",
                        help="tiny: the executors' own cost; base: Florence-2-base shapes (for a GPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES)[:4], choices=list(MODES))
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "IMAGES", "OUTPUT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_run(*args.one, batch_size=args.batch_size, workers=args.workers, device=args.device)
        return

    work = Path(tempfile.mkdtemp(prefix="captionkit-executors-"))
    try:
        measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> None:
    from captionkit.testing import build_florence2_base_sized, build_tiny_florence2

    model = work / f"{args.size}-florence2"
    if args.size == "base":
        build_florence2_base_sized(model)
    else:
        build_tiny_florence2(model)
    images = work / "images"
    make_images(images, args.images, args.image_size)
    large = work / "large"
    make_images(large, 20, 1024)
    print(f"{args.images} JPEGs of {args.image_size}², batch {args.batch_size}, {os.cpu_count()} CPUs, "
          f"{args.size} Florence-2 (12 new tokens, greedy), device {args.device}, decode workers "
          f"{args.workers or 'chosen'}; {args.repeats} interleaved rounds, medians", flush=True)
    runs_of: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        shift = repeat % len(args.modes)
        for mode in args.modes[shift:] + args.modes[:shift]:
            runs = runs_of[mode]
            output = work / f"out-{mode}-{repeat}"
            command = [sys.executable, __file__, "--batch-size", str(args.batch_size), "--device", args.device,
                       *(["--workers", str(args.workers)] if args.workers else []),
                       "--one", str(model), str(images), str(output), mode]
            started = time.perf_counter()
            done = subprocess.run(command, env={**os.environ, **MODES[mode]["env"], "HF_HUB_OFFLINE": "1"},
                                  capture_output=True, text=True, timeout=1200)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            assert summary["processed"] == args.images, summary
            runs.append({"wall_s": wall, "first_result_s": summary["first_result_s"],
                         "steady_images_per_s": summary["steady_images_per_s"],
                         "end_to_end_images_per_s": args.images / wall,
                         "model_busy_fraction": summary["model_busy_fraction"],
                         "decode_workers": summary["decode_workers"] or 0})
            print(f"  round {repeat + 1} {mode}: steady {summary['steady_images_per_s']:.1f} img/s, model busy "
                  f"{summary['model_busy_fraction']:.2f}, decode workers {summary['decode_workers']}", flush=True)
    results: dict[str, dict] = {}
    for mode, runs in runs_of.items():
        results[mode] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        results[mode]["runs"] = runs
    base = next(iter(results.values()))  # the first mode named: the reference
    print(f"{'mode':18} {'wall s':>7} {'1st result s':>13} {'steady img/s':>13} {'busy':>5} {'wall: this/ref':>15} "
          f"{'steady: this/ref':>17}")
    for mode, result in results.items():
        print(f"{mode:18} {result['wall_s']:7.1f} {result['first_result_s']:13.1f} "
              f"{result['steady_images_per_s']:13.1f} {result['model_busy_fraction']:5.2f} "
              f"{result['wall_s'] / base['wall_s']:14.2f}x "
              f"{result['steady_images_per_s'] / base['steady_images_per_s']:16.2f}x")
    costs = {
        "prepare_ms_per_image": 1000 * prepare_cost(str(model), images),
        "prepare_ms_per_image_1024": 1000 * prepare_cost(str(model), large),
        "prepare_ms_per_image_1024_to_768": 1000 * prepare_cost(str(model), large, side=768),
        "tagger_prepare_ms_per_image_1024_to_448": 1000 * tagger_prepare_cost(large),
        "commit_ms_per_image": 1000 * statistics.median(commit_cost(work / f"commit-{index}") for index in range(3)),
        "commit_ms_per_image_store_only": 1000 * statistics.median(
            commit_cost(work / f"store-{index}", sidecars=False) for index in range(3)),
    }
    print(f"per image: prepare (decode + preprocess, 1 thread) {costs['prepare_ms_per_image']:.2f} ms at "
          f"{args.image_size}², {costs['prepare_ms_per_image_1024']:.2f} ms at 1024² (to 64²), "
          f"{costs['prepare_ms_per_image_1024_to_768']:.2f} ms at 1024² to Florence-2's 768², "
          f"{costs['tagger_prepare_ms_per_image_1024_to_448']:.2f} ms at 1024² to a tagger's 448²; "
          f"driver commit (store + sidecar) {costs['commit_ms_per_image']:.3f} ms, store only "
          f"{costs['commit_ms_per_image_store_only']:.3f} ms")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "results": results,
                                         "costs": costs}, indent=2, default=str))


if __name__ == "__main__":
    main()
