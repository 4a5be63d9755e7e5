"""GPU checks for captionkit: throughput, precision, parity and multi-process runs on a CUDA device.

Why: captionkit's tests and benchmarks only ever run on CPUs; these checks show what the
pipeline does on a GPU, in every precision, against plain reference loops on the same device.
Each subcommand is one check, meant to run in its own process (under ``timeout``) so one
that fails or hangs leaves the others alone; ``benchmarks/gpu_checks.sh`` runs them all in
order of importance and logs everything. ``prepare`` builds the shared models and JPEGs once.

    python benchmarks/gpu_checks.py prepare --work /tmp/ck-gpu --images 384
    python benchmarks/gpu_checks.py florence --work /tmp/ck-gpu --device cuda \
        --configs fp32:32:sdpa:12,bf16:32:sdpa:12,bf16:64:sdpa:12,fp16:32:sdpa:12,bf16:32:eager:12
    python benchmarks/gpu_checks.py parity --work /tmp/ck-gpu --device cuda
    python benchmarks/gpu_checks.py devices --work /tmp/ck-gpu --devices cuda:0,cuda:0
    python benchmarks/gpu_checks.py vlms --work /tmp/ck-gpu --device cuda --dtype bf16

On a CPU (to prove the script runs): the same with ``--device cpu``, ``--devices cpu,cpu``,
a few images and ``--size tiny`` for ``prepare`` and ``florence``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from caption_throughput import decode_only, pipeline, reference_loop  # noqa: E402

from captionkit._torchvision_compat import ensure_torchvision  # noqa: E402
from captionkit.testing import run_state  # noqa: E402

ensure_torchvision()

GENERATE = {"max_new_tokens": 20, "num_beams": 1, "do_sample": False}
PROMPT = "Describe this image in one sentence."


# -- shared inputs -------------------------------------------------------------------------


def _one_image(job: tuple[Path, int, int]) -> Path:
    """One photo-like JPEG (gradients + ellipses), seeded by its index."""
    import numpy as np
    from caption_throughput import photo

    path, index, size = job
    photo(np.random.default_rng(index), size).save(path, quality=90)
    return path


def write_images(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` JPEGs of ``size``² pixels, written in parallel processes."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"photo{index:04d}.jpg", index, size) for index in range(count)]
    with ProcessPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        return list(pool.map(_one_image, jobs))


def image_paths(work: Path) -> list[Path]:
    return sorted((work / "images").glob("*.jpg"))


def subset(work: Path, name: str, count: int) -> Path:
    """A folder holding copies of the first ``count`` shared JPEGs (same mtimes)."""
    folder = work / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in image_paths(work)[:count]:
        shutil.copy2(path, folder / path.name)
    return folder


def prepare(args: argparse.Namespace) -> None:
    from captionkit.testing import build_florence2_base_sized, build_tiny_florence2

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = write_images(work / "images", args.images, args.source_size)
    print(f"prepare: {len(paths)} JPEGs of {args.source_size}² in {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    if args.size == "base":
        build_florence2_base_sized(work / "florence-main")
    else:
        build_tiny_florence2(work / "florence-main")
    build_tiny_florence2(work / "florence-tiny")
    print(f"prepare: Florence-2 {args.size} (main) and tiny built in {time.perf_counter() - started:.1f}s")


# -- helpers -------------------------------------------------------------------------------


def guarded(name: str, work: Callable[[], Any]) -> Any:
    """Run one part of a check; a failure is printed with its traceback and does not stop the rest."""
    started = time.perf_counter()
    try:
        result = work()
    except Exception as error:  # noqa: BLE001 - every failure is reported, the next part still runs
        print(f"[{name}] FAILED after {time.perf_counter() - started:.1f}s: {type(error).__name__}: {error}")
        traceback.print_exc()
        sys.stdout.flush()
        return None
    print(f"[{name}] done in {time.perf_counter() - started:.1f}s")
    sys.stdout.flush()
    return result


def stored_texts(folder: Path, step: str = "caption") -> dict[str, str]:
    """record id → caption text, from a run's store."""
    from captionkit.core.store import Store

    with Store(folder) as store:
        return {result.record_id: result.text or "" for result in store.iter_results(step)}


def stored_parsed(folder: Path, step: str = "caption") -> dict[str, str]:
    """record id → the raw parsed Florence-2 caption (before captionkit's text clean-up)."""
    from captionkit.core.store import Store

    with Store(folder) as store:
        return {result.record_id: str((result.raw or {}).get("parsed", "")) for result in store.iter_results(step)}


def finite_logits(model_folder: Path, paths: list[Path], device: str, dtype: str, attn: str) -> tuple[bool, str]:
    """One forward pass (image + prompt, one decoder token) in ``dtype``: are all logits finite?"""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from captionkit.models.florence2 import resolve_dtype

    torch_dtype = resolve_dtype(dtype, device, warn=False)
    processor = AutoProcessor.from_pretrained(model_folder)
    model = Florence2ForConditionalGeneration.from_pretrained(
        model_folder, dtype=torch_dtype, attn_implementation=attn).to(device).eval()
    images = [Image.open(path).convert("RGB") for path in paths]
    inputs = processor(text=["<CAPTION>"] * len(images), images=images, return_tensors="pt")
    start = model.config.text_config.decoder_start_token_id
    with torch.inference_mode():
        logits = model(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device),
                       pixel_values=inputs["pixel_values"].to(device, torch_dtype),
                       decoder_input_ids=torch.full((len(images), 1), start, device=device)).logits
    finite = bool(torch.isfinite(logits).all())
    return finite, f"logits {tuple(logits.shape)} {logits.dtype}, max |x| {float(logits.float().abs().max()):.2f}"


# -- check 1: Florence-2 throughput per precision --------------------------------------------


def florence(args: argparse.Namespace) -> None:
    import torch

    work = Path(args.work)
    model = work / "florence-main"
    paths = image_paths(work)
    reference_paths = paths[: args.reference_images]
    print(f"florence: {len(paths)} JPEGs (reference loop on the first {len(reference_paths)}), "
          f"max_new_tokens {GENERATE['max_new_tokens']}, greedy, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    decode = guarded("decode-only", lambda: decode_only(model, paths, args.decode_workers))
    if decode:
        print(f"decode+preprocess only ({args.decode_workers} threads): {decode:.1f} images/s")
    checked: set[tuple[str, str]] = set()
    for spec in args.configs.split(","):
        dtype, batch, attn, workers = spec.split(":")
        tag = f"{dtype}-b{batch}-{attn}-w{workers}"

        def one(dtype: str = dtype, batch: int = int(batch), attn: str = attn, workers: int = int(workers),
                tag: str = tag) -> None:
            if (dtype, attn) not in checked:
                checked.add((dtype, attn))
                finite, detail = finite_logits(model, paths[:4], args.device, dtype, attn)
                print(f"  {tag}: finite logits: {finite} ({detail})")
            reference_captions: list[str] = []
            reference = reference_loop(model, reference_paths, batch, GENERATE, device=args.device, dtype=dtype,
                                       attn_implementation=attn, captions=reference_captions)
            out = work / f"out-{tag}"
            shutil.rmtree(out, ignore_errors=True)
            summary = pipeline(model, work / "images", batch, workers, GENERATE, out, device=args.device,
                               dtype=dtype, attn_implementation=attn)
            rate = summary.processed / summary.processing_s
            texts = stored_texts(out)
            non_empty = sum(bool(text.strip()) for text in texts.values())
            parsed = stored_parsed(out)
            same = sum(parsed.get(path.name) == text for path, text in zip(reference_paths, reference_captions,
                                                                            strict=True))
            overall = summary.processed / max(summary.elapsed_s - summary.model_load_s, 1e-9)
            print(f"  {tag}: reference {reference:.1f} images/s | captionkit {rate:.1f} images/s "
                  f"(model busy {summary.model_busy_fraction:.0%}, incl. planning+store {overall:.1f}/s, "
                  f"load {summary.model_load_s:.1f}s, final batch {summary.batch_size_final}, "
                  f"failed {summary.failed}) | ratio {rate / reference:.2f}x")
            for path, text in zip(reference_paths, reference_captions, strict=True):
                if parsed.get(path.name) != text:
                    print(f"  {tag}: first difference {path.name}: reference {text[:50]!r} vs captionkit "
                          f"{parsed.get(path.name, '')[:50]!r}")
                    break
            sample = next(iter(texts.values()), "")
            print(f"  {tag}: {non_empty}/{len(texts)} captions non-empty; raw caption of reference == captionkit on "
                  f"{same}/{len(reference_captions)}; e.g. {sample[:60]!r}")
            if args.device.startswith("cuda"):
                print(f"  {tag}: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
                torch.cuda.reset_peak_memory_stats()

        guarded(f"florence {tag}", one)


# -- check 2: tiny Florence-2, device vs CPU ----------------------------------------------


def parity(args: argparse.Namespace) -> None:
    import captionkit

    work = Path(args.work)
    model = work / "florence-tiny"
    folder = subset(work, "parity-images", args.images)
    options = {"model": str(model), "batch_size": 8, "workers": 4, "progress": "quiet", "write_sidecars": False,
               "max_new_tokens": GENERATE["max_new_tokens"], "num_beams": 1}
    runs: dict[str, dict[str, str]] = {}
    for device, dtype in (("cpu", "fp32"), (args.device, "fp32"), (args.device, "bf16"), (args.device, "fp16")):
        tag = f"{device}-{dtype}"
        if tag in runs:
            continue

        def one(device: str = device, dtype: str = dtype, tag: str = tag) -> None:
            out = work / f"parity-{tag}"
            shutil.rmtree(out, ignore_errors=True)
            summary = captionkit.caption(folder, output_dir=out, device=device, dtype=dtype, **options)
            runs[tag] = stored_texts(out)
            non_empty = sum(bool(text.strip()) for text in runs[tag].values())
            print(f"  {tag}: processed {summary.processed}, failed {summary.failed}, "
                  f"{non_empty}/{len(runs[tag])} non-empty")

        guarded(f"parity {tag}", one)
    cpu = runs.get("cpu-fp32")
    for tag, texts in runs.items():
        if cpu is None or tag == "cpu-fp32":
            continue
        same = sum(texts.get(name) == text for name, text in cpu.items())
        print(f"parity: {tag} vs cpu-fp32: {same}/{len(cpu)} captions identical")
        for name, text in list(cpu.items()):
            if texts.get(name) != text:
                print(f"    first difference {name}: cpu {text[:50]!r} vs {tag} {texts.get(name, '')[:50]!r}")
                break


# -- check 3: --devices vs the local executor ---------------------------------------------


def devices(args: argparse.Namespace) -> None:
    import captionkit

    work = Path(args.work)
    model = work / "florence-tiny"
    options = {"model": str(model), "batch_size": 2, "workers": 2, "progress": "quiet", "max_new_tokens": 12,
               "num_beams": 1, "dtype": args.dtype}
    source = subset(work, "devices-local", args.images)
    (source / "broken.png").write_bytes(b"")  # one bad file: its error row must match too
    shutil.rmtree(work / "devices-devices", ignore_errors=True)  # copies keep mtimes: same file signatures
    copy = shutil.copytree(source, work / "devices-devices", copy_function=shutil.copy2)
    folders = {"local": source, "devices": copy}
    local = guarded("devices local", lambda: captionkit.caption(folders["local"], device=args.device, **options))
    several = guarded("devices several", lambda: captionkit.caption(folders["devices"], device=args.device,
                                                                   devices=args.devices, **options))
    for name, summary in (("local", local), (f"devices={args.devices}", several)):
        if summary is not None:
            print(f"  {name}: processed {summary.processed}, failed {summary.failed}, files "
                  f"{summary.files_written}, {summary.elapsed_s:.1f}s, {summary.images_per_s:.1f} images/s")
    if local is None or several is None:
        return
    left, right = run_state(folders["local"]), run_state(folders["devices"])
    same_rows = sum(left["rows"].get(key) == value for key, value in right["rows"].items())
    same_files = sum(left["sidecars"].get(key) == value for key, value in right["sidecars"].items())
    print(f"devices: store rows identical {same_rows}/{len(left['rows'])} (devices run has {len(right['rows'])}); "
          f"sidecars identical {same_files}/{len(left['sidecars'])} (devices run has {len(right['sidecars'])}); "
          f"leftovers {left['leftovers'] + right['leftovers']}; whole state equal: {left == right}")
    for key, value in left["rows"].items():
        if right["rows"].get(key) != value:
            print(f"    first differing row {key}: local {value} vs devices {right['rows'].get(key)}")
            break


# -- check 6: chat VLMs -------------------------------------------------------------------


def vlms(args: argparse.Namespace) -> None:
    import captionkit
    from captionkit.core.errors import CaptionkitError

    work = Path(args.work)
    folder = work / "vlm-images"
    shutil.rmtree(folder, ignore_errors=True)
    write_images(folder, args.images, args.image_side)
    builders = {
        "llava": ("captionkit.testing.vlms.llava", "build_llava"),
        "qwen2_vl": ("captionkit.testing.vlms.qwen_vl", "build_qwen2_vl"),
        "smolvlm": ("captionkit.testing.vlms.idefics", "build_smolvlm"),
        "idefics3": ("captionkit.testing.vlms.idefics", "build_idefics3"),
    }
    built: dict[str, Path] = {}
    for family in args.families.split(","):
        module, function = builders[family]

        def one(family: str = family, module: str = module, function: str = function) -> None:
            import importlib

            model = getattr(importlib.import_module(module), function)(work / f"tiny-{family}")
            built[family] = model
            out = work / f"vlm-out-{family}"
            shutil.rmtree(out, ignore_errors=True)
            summary = captionkit.caption(folder, model=str(model), prompt=PROMPT, device=args.device,
                                         dtype=args.dtype, max_new_tokens=16, batch_size=args.images,
                                         output_dir=out, progress="quiet", write_sidecars=False)
            texts = stored_texts(out)
            non_empty = sum(bool(text.strip()) for text in texts.values())
            print(f"  {family}: processed {summary.processed}, failed {summary.failed} {dict(summary.errors)}, "
                  f"{summary.images_per_s:.1f} images/s, load {summary.model_load_s:.1f}s, {non_empty}/{len(texts)} "
                  f"non-empty, e.g. {next(iter(texts.values()), '')[:50]!r}")

        guarded(f"vlm {family}", one)

    def flash_api() -> None:
        model = next(iter(built.values()))
        try:
            captionkit.caption(folder, model=str(model), prompt=PROMPT, device=args.device, dtype=args.dtype,
                               attn_implementation="flash_attention_2", output_dir=work / "vlm-flash",
                               progress="quiet")
            print("  flash_attention_2 (API): no error (flash-attn installed?)")
        except CaptionkitError as error:
            print(f"  flash_attention_2 (API): {type(error).__name__}: {error}")

    def flash_cli() -> None:
        for name, model in (("vlm", next(iter(built.values()))), ("florence", work / "florence-tiny")):
            command = [sys.executable, "-m", "captionkit.cli", "caption", str(folder), "--model", str(model),
                       "--device", args.device, "--dtype", args.dtype, "--attn-implementation", "flash_attention_2",
                       "--output-dir", str(work / f"cli-flash-{name}"), "--quiet"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1"})
            stderr = result.stderr.strip()
            print(f"  flash_attention_2 (CLI, {name}): exit {result.returncode}; traceback in stderr: "
                  f"{'Traceback' in stderr}; {len(stderr.splitlines())} stderr line(s): {stderr[-400:]!r}")

    if built:
        guarded("flash api", flash_api)
        guarded("flash cli", flash_cli)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("prepare", help="shared JPEGs and Florence-2 folders")
    one.add_argument("--size", choices=["tiny", "base"], default="base", help="the main Florence-2 for 'florence'")
    one.add_argument("--images", type=int, default=384)
    one.add_argument("--source-size", type=int, default=1024)
    one = commands.add_parser("florence", help="check 1: throughput per dtype/batch/attention")
    one.add_argument("--device", default="cuda")
    one.add_argument("--configs", default="fp32:32:sdpa:12,bf16:32:sdpa:12,bf16:64:sdpa:12,fp16:32:sdpa:12,"
                                          "bf16:32:eager:12,bf16:32:sdpa:4",
                     help="comma-separated dtype:batch:attention:workers")
    one.add_argument("--reference-images", type=int, default=128, help="images the reference loop times")
    one.add_argument("--decode-workers", type=int, default=12)
    one = commands.add_parser("parity", help="check 2: tiny Florence-2 on the device vs the CPU")
    one.add_argument("--device", default="cuda")
    one.add_argument("--images", type=int, default=16)
    one = commands.add_parser("devices", help="check 3: --devices vs the local executor")
    one.add_argument("--device", default="cuda")
    one.add_argument("--devices", default="cuda:0,cuda:0")
    one.add_argument("--dtype", default="fp32")
    one.add_argument("--images", type=int, default=16)
    one = commands.add_parser("vlms", help="check 6: tiny chat VLMs, and the flash-attention error")
    one.add_argument("--device", default="cuda")
    one.add_argument("--dtype", default="bf16")
    one.add_argument("--families", default="llava,qwen2_vl,smolvlm")
    one.add_argument("--images", type=int, default=8)
    one.add_argument("--image-side", type=int, default=384)
    for sub in commands.choices.values():
        sub.add_argument("--work", default="/tmp/ck-gpu", help="folder shared by the checks")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    {"prepare": prepare, "florence": florence, "parity": parity, "devices": devices, "vlms": vlms}[args.command](args)
    print(f"== {args.command} finished in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
