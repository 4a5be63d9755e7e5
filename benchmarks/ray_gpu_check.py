"""Ray on a GPU: ``executor="ray"`` against the local executor on the same images, same model, same device.

Why: the Ray executor (a Ray Data CPU stage + one model actor per GPU) had only run on CPU
machines. This script measures what it costs or gains on a GPU and checks that it leaves the
same store rows and sidecars as the local executor, in three parts, each guarded so a failure
prints its traceback and the next part still runs:

a. throughput: a random Florence-2 with Florence-2-base's shapes on ``--images`` 1024² JPEGs,
   local vs Ray (1 actor, ``--ray-gpus`` GPUs, ``--ray-cpus`` CPUs). Ray is started by captionkit
   itself for each Ray run: a Ray run's ``wall_s`` includes Ray's start, the listing on Ray and
   the shutdown; captionkit's ``elapsed_s`` starts after the listing and leaves them out, and its
   ``processing_s`` includes the actor's process start and the first (warm-up) batch.
b. parity: the tiny random Florence-2 in fp32 on ``--parity-images`` images, local vs Ray.
c. parity and speed for a random timm tagger (convnext_atto), local vs Ray.

``--parts a`` (or b, c) runs one part: on a machine where a Ray run might hang (an actor waiting
for resources), run each part in its own process under ``timeout``. With ``--ray-gpus`` above 0
the script stops at once when Ray would detect no GPU.

    # on a GPU machine (captionkit and ray importable; see benchmarks/gpu_checks.sh for carried wheels)
    python benchmarks/ray_gpu_check.py --device cuda --images 256 --parity-images 64 --tag-images 128
    # here, to prove it runs (tiny model only, one Ray CPU per actor on a 2-CPU machine)
    PYTHONPATH=src .venv/bin/python benchmarks/ray_gpu_check.py --device cpu --images 0 --parity-images 6 \
        --tag-images 6 --ray-gpus 0 --ray-cpus 1 --workers 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from captionkit._torchvision_compat import ensure_torchvision  # noqa: E402
from captionkit.testing import run_state as state  # noqa: E402

ensure_torchvision()

NUMBERS = ("processed", "failed", "elapsed_s", "model_load_s", "processing_s", "images_per_s",
           "model_busy_fraction", "batch_size_final")


def guarded(name: str, work: Callable[[], Any]) -> Any:
    """Run one part; a failure is printed with its traceback (and Ray's worker errors) and the rest still runs."""
    from gpu_checks import guarded as guarded_part

    result = guarded_part(name, work)
    if result is None:
        ray_worker_errors()
    return result


def ray_worker_errors(lines: int = 30) -> None:
    """The ends of the newest non-empty Ray worker stderr logs (the driver sets log_to_driver=False)."""
    logs = sorted(Path("/tmp/ray").glob("session_2*/logs/*.err"), key=lambda path: path.stat().st_mtime)
    shown = 0
    for path in reversed(logs):
        text = path.read_text(errors="replace").strip()
        if text and ("Error" in text or "Traceback" in text) and shown < 3:
            print(f"--- {path} (last {lines} lines)")
            print("\n".join(text.splitlines()[-lines:]))
            shown += 1


def compare(name: str, local: Path, ray: Path, step: str) -> bool:
    """Print whether the two runs left the same state, and where they differ."""
    a, b = state(local, step), state(ray, step)
    same_rows = sum(1 for key, row in a["rows"].items() if b["rows"].get(key) == row)
    same_files = sum(1 for key, text in a["sidecars"].items() if b["sidecars"].get(key) == text)
    equal = a == b
    print(f"{name}: PARITY {'YES' if equal else 'NO'}: store rows identical {same_rows}/{len(a['rows'])} "
          f"(ray run has {len(b['rows'])}); sidecars identical {same_files}/{len(a['sidecars'])} "
          f"(ray run has {len(b['sidecars'])}); leftovers local {a['leftovers']} ray {b['leftovers']}; "
          f"distinct texts {len({row[1] for row in a['rows'].values()})}")
    if not equal:
        fields = ("status", "text", "raw", "fingerprint", "content_hash", "file_signature", "error", "notes")
        for key, row in a["rows"].items():
            other = b["rows"].get(key)
            if other != row:
                differing = [field for field, x, y in zip(fields, row, other or (None,) * 8, strict=True) if x != y]
                print(f"  first differing row {key}: fields {differing}")
                for field, x, y in zip(fields, row, other or (None,) * 8, strict=True):
                    if x != y:
                        print(f"    {field}: local {str(x)[:200]!r} | ray {str(y)[:200]!r}")
                break
    return equal


def report(label: str, summary, wall: float) -> dict[str, Any]:
    numbers = summary.as_dict()
    picked = {key: numbers[key] for key in NUMBERS}
    picked["wall_s"] = round(wall, 3)
    print(f"  {label}: " + ", ".join(f"{key} {value}" for key, value in picked.items()))
    if summary.errors:
        print(f"  {label} errors (first 3): {dict(list(summary.errors.items())[:3])}")
    sys.stdout.flush()
    return picked


def timed(work: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def copies(source: Path, target: Path, count: int) -> Path:
    """A folder holding copies of the first ``count`` JPEGs of ``source`` (same mtimes: same signatures)."""
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.jpg"))[:count]:
        shutil.copy2(path, target / path.name)
    return target


def local_vs_ray(name: str, run: Callable[..., Any], source: Path, work: Path, count: int, step: str,
                 ray_options: dict[str, Any]) -> None:
    """``run(folder, **extra)`` on two copies: local first, then Ray; numbers, ratios and parity."""
    local_folder = copies(source, work / f"{name}-local", count)
    ray_folder = copies(source, work / f"{name}-ray", count)
    local = guarded(f"{name} local", lambda: timed(lambda: run(local_folder)))
    remote = guarded(f"{name} ray", lambda: timed(lambda: run(ray_folder, **ray_options)))
    numbers = {}
    if local:
        numbers["local"] = report(f"{name} local", *local)
    if remote:
        numbers["ray"] = report(f"{name} ray  ", *remote)
    if local and remote:
        a, b = numbers["local"], numbers["ray"]
        rate = b["images_per_s"] / a["images_per_s"] if a["images_per_s"] else float("nan")
        print(f"  {name}: ratio ray/local images_per_s {rate:.3f}; wall {b['wall_s'] / a['wall_s']:.3f} "
              f"({b['wall_s']:.1f}s / {a['wall_s']:.1f}s); elapsed_s {b['elapsed_s'] / a['elapsed_s']:.3f}")
        guarded(f"{name} parity", lambda: compare(name, local_folder, ray_folder, step))


def ray_gpus_visible() -> int:
    """The GPUs a Ray started here would offer (what ``ray.init`` detects); 0 is printed as a stop."""
    try:
        from ray._private.accelerators import NvidiaGPUAcceleratorManager

        count = NvidiaGPUAcceleratorManager.get_current_node_num_accelerators()
    except Exception as error:  # noqa: BLE001 - a private Ray API: report it and carry on
        print(f"ray GPU detection not checked ({type(error).__name__}: {error})")
        return 1
    print(f"ray sees {count} GPU(s)" + ("" if count else ": the Ray runs would wait forever; stopping"))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--images", type=int, default=256, help="JPEGs for part a (0 skips it)")
    parser.add_argument("--parity-images", type=int, default=64, help="JPEGs for part b (0 skips it)")
    parser.add_argument("--tag-images", type=int, default=128, help="JPEGs for part c (0 skips it)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--ray-gpus", type=float, default=1.0, help="GPUs per Ray actor")
    parser.add_argument("--ray-cpus", type=float, default=2.0, help="CPUs per Ray actor")
    parser.add_argument("--parts", default="a,b,c", help="which parts to run (run each in its own process under "
                        "`timeout` on a machine where a Ray run might hang)")
    parser.add_argument("--work", help="work folder (default: a temporary one)")
    args = parser.parse_args()

    import torch
    from gpu_checks import write_images
    from tag_throughput import build_model_folder

    import captionkit
    from captionkit.testing import build_florence2_base_sized, build_tiny_florence2

    try:
        import ray

        ray_version = ray.__version__
    except ImportError as error:
        ray_version = f"not importable ({error})"
    print(f"python {sys.version.split()[0]} | torch {torch.__version__} | ray {ray_version} | cpus {os.cpu_count()}"
          f" | device {args.device}" + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else ""))
    ray_options = {"executor": "ray", "ray_actors": 1, "ray_gpus_per_actor": args.ray_gpus,
                   "ray_cpus_per_actor": args.ray_cpus}
    print(f"ray options: {ray_options}; batch {args.batch_size}, workers {args.workers}")
    if args.ray_gpus > 0 and not ray_gpus_visible():
        return  # an actor asking for a GPU would wait forever
    parts = set(args.parts.split(","))
    args.images, args.parity_images, args.tag_images = (
        args.images if "a" in parts else 0, args.parity_images if "b" in parts else 0,
        args.tag_images if "c" in parts else 0)
    common = {"batch_size": args.batch_size, "max_new_tokens": 20, "num_beams": 1, "workers": args.workers,
              "progress": "quiet", "device": args.device}
    temp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or temp.name)
    if args.work:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    count = max(args.images, args.parity_images, args.tag_images)
    write_images(work / "images", count, args.image_size)
    print(f"prepare: {count} JPEGs of {args.image_size}² in {time.perf_counter() - started:.1f}s")
    sys.stdout.flush()

    if args.images:
        print(f"\n== a. Florence-2-base-sized, {'bf16' if args.device == 'cuda' else 'fp32'}, {args.images} images")
        base = guarded("a build", lambda: build_florence2_base_sized(work / "florence-base"))
        if base:
            dtype = "bf16" if args.device == "cuda" else "fp32"
            local_vs_ray("a-base", lambda folder, **extra: captionkit.caption(
                folder, model=str(base), dtype=dtype, **common, **extra), work / "images", work, args.images,
                "caption", ray_options)

    if args.parity_images:
        print(f"\n== b. tiny Florence-2, fp32, {args.parity_images} images")
        tiny = guarded("b build", lambda: build_tiny_florence2(work / "florence-tiny"))
        if tiny:
            local_vs_ray("b-tiny", lambda folder, **extra: captionkit.caption(
                folder, model=str(tiny), dtype="fp32", **common, **extra), work / "images", work,
                args.parity_images, "caption", ray_options)

    if args.tag_images:
        print(f"\n== c. random convnext_atto tagger (1000 tags, 224 px), {args.tag_images} images")
        tagger = guarded("c build", lambda: build_model_folder(work / "tagger-model", "convnext_atto", 224, 1000))
        if tagger:
            local_vs_ray("c-tagger", lambda folder, **extra: captionkit.tag(
                folder, model=str(tagger), batch_size=args.batch_size, workers=args.workers, device=args.device,
                progress="quiet", **extra), work / "images", work, args.tag_images, "tags", ray_options)

    print(f"\nall parts ended after {time.perf_counter() - started:.1f}s")
    if temp:
        temp.cleanup()


if __name__ == "__main__":
    main()
