"""Command line: a thin Typer layer over the library API in :mod:`captionkit.api`."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Annotated

import typer

from captionkit.core.errors import CaptionkitError
from captionkit.core.exit_codes import CONTRACT as _EXIT_CODES

app = typer.Typer(
    name="captionkit",
    help="Caption, tag and train the labellers of image datasets for text-to-image training.",
    epilog=_EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

def _version(value: bool) -> None:
    if value:
        from captionkit import __version__

        print(f"captionkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_version,
                                          is_eager=True)] = False,
) -> None:
    """Caption, tag and train the labellers of image datasets for text-to-image training."""


_MODEL_HELP = "Hub id or local folder (a model downloaded elsewhere, or trained with captionkit)."


_MAX_FAILURES_HELP = ("Still exit 0 when at most this many images fail: a number (5) or a percentage of the "
                      "images tried (2%). Default 0.")


def _exit_for_summary(summary, allowance) -> None:
    """Exit with the contract's code (see ``captionkit --help``) for a caption or tag run."""
    from captionkit.core.exit_codes import OK, run_exit_code

    unwritten = len(summary.write_errors)  # stored, but the caption file is missing: not done
    code = run_exit_code(succeeded=summary.processed + summary.reused - unwritten,
                         failed=summary.failed + unwritten, allowance=allowance,
                         stopped_early=summary.stopped_early is not None, interrupted=summary.interrupted)
    if code != OK:
        raise typer.Exit(code)


def _print_summary(summary, progress: str) -> None:
    if progress == "json":
        if summary.stopped_early:  # stdout is the JSON stream; the reason still reaches a person
            print(summary.stopped_early, file=sys.stderr)
        return
    data = summary.as_dict()
    out = sys.stderr
    print(
        f"{summary.field}: {summary.processed} done, {summary.reused} already done, {summary.skipped} skipped, "
        f"{summary.failed} failed of {summary.total} in {summary.elapsed_s:.1f}s "
        f"({summary.images_per_s:.2f} images/s, model busy {summary.model_busy_fraction:.0%}, "
        f"{summary.files_written} files written)",
        file=out,
    )
    errors = data["errors"]
    if summary.stopped_early:
        print(summary.stopped_early, file=out)
        # the reason is said once above, not once per image
        errors = {record_id: reason for record_id, reason in errors.items()
                  if reason.partition(": ")[2].rstrip(".") not in summary.stopped_early}
        if len(errors) < len(data["errors"]):
            print(f"  {len(data['errors']) - len(errors)} images failed for that reason", file=out)
    elif summary.interrupted:
        print("Stopped early (Ctrl-C): everything finished so far is saved; run again to continue.", file=out)
    for record_id, reason in list(errors.items())[:50]:
        print(f"  failed  {_failure_line(record_id, reason)}", file=out)
    if len(errors) > 50:
        print(f"  ... and {len(errors) - 50} more failures (see .captionkit/run.log)", file=out)
    if summary.failed_earlier:
        print(f"  {summary.failed_earlier} of the failures are unchanged files that failed before and were not "
              "tried again (--retry-errors to try them)", file=out)
    if summary.skipped and progress != "quiet":
        print(f"  {summary.skipped} images kept their existing caption file (--existing overwrite|append|"
              "fill-empty to change that)", file=out)
    for target, ids in data["collisions"].items():
        print(f"  collision  {target} would be shared by {' and '.join(ids)}", file=out)
    for record_id, reason in list(data["write_errors"].items())[:20]:
        print(f"  not written  {_failure_line(record_id, reason)}", file=out)


def _failure_line(record_id: str, reason: str) -> str:
    """'img.png: reason', naming the file once: most reasons already start with the file's full path."""
    path, separator, rest = reason.partition(": ")
    if separator and (path == record_id or path.replace("\\", "/").endswith("/" + record_id)):
        return f"{record_id}: {rest}"
    return f"{record_id}: {reason}"


_FLORENCE = "Florence-2 options"
_CHAT = "Chat model options (BLIP-2, LLaVA, Qwen2-VL, ...; also servers and vLLM)"
_SERVER = "OpenAI-compatible server (--backend openai)"
_VLLM = "vLLM engine (--backend vllm)"
_SCALE = "Scaling out (a Ray cluster, several GPUs; docs/scaling.md)"
_EXECUTOR = typer.Option(help="local (this process) or ray (a Ray cluster; pip install 'captionkit\\[ray]'). Results are the same.", rich_help_panel=_SCALE)
_RAY_ADDRESS = typer.Option(help="With --executor ray: auto (the cluster this machine is in), ray://HOST:10001, or leave out to start Ray here.", rich_help_panel=_SCALE)
_RAY_ACTORS = typer.Option(help="With --executor ray: model replicas (default: one per GPU of the cluster, or 1).", rich_help_panel=_SCALE)
_RAY_GPUS = typer.Option(help="With --executor ray: GPUs per model replica, fractions allowed (default: 1 when the cluster has GPUs, else 0).", rich_help_panel=_SCALE)
_RAY_CPUS = typer.Option(help="With --executor ray: CPUs per model replica.", rich_help_panel=_SCALE)
_RAY_STALL = typer.Option(help="With --executor ray: end the run (keeping what finished) when nothing moves for this many seconds: a hung model, actors that cannot be placed. 0: never.", rich_help_panel=_SCALE)
_STORAGE_OPTIONS = typer.Option(help="Object storage (s3://, gs://, az://, hf:// inputs and outputs): JSON of fsspec filesystem options, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"http://minio:9000\"}}'. Credentials also come from the environment and profiles; never stored or logged.", rich_help_panel=_SCALE)
_IO_WORKERS = typer.Option(help="Object-store fetches in flight at once (remote images; retried on 5xx and timeouts).", rich_help_panel=_SCALE)
_DEVICES = typer.Option(help="Several GPUs of this machine without Ray: cuda:0,cuda:1 runs one worker process per device over disjoint shards.", rich_help_panel=_SCALE)


@app.command(epilog=_EXIT_CODES)
def caption(
    path: Annotated[str, typer.Argument(help="Folder of images, one image, or a manifest (jsonl/json/csv/tsv/parquet); local or a URL (s3://bucket/prefix, gs://, az://, hf://).")],
    model: Annotated[str | None, typer.Option(help=_MODEL_HELP + " The family comes from its config.json. Default: florence-community/Florence-2-base, or the base of --adapter.")] = None,
    backend: Annotated[str, typer.Option(help="auto (transformers, in this process), openai (an OpenAI-compatible server) or vllm (a vLLM engine).")] = "auto",
    task: Annotated[str | None, typer.Option(help="Florence-2 task: <CAPTION> (default), <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>, <OCR>, <OD>, ...", rich_help_panel=_FLORENCE)] = None,
    task_input: Annotated[str | None, typer.Option(help="Text for tasks that take one (e.g. <CAPTION_TO_PHRASE_GROUNDING>).", rich_help_panel=_FLORENCE)] = None,
    num_beams: Annotated[int | None, typer.Option(help="Beam search width (default 3; 1 = greedy, fastest).", rich_help_panel=_FLORENCE)] = None,
    early_stopping: Annotated[bool, typer.Option(help="Stop beam search when num_beams candidates are done.", rich_help_panel=_FLORENCE)] = False,
    no_repeat_ngram_size: Annotated[int | None, typer.Option(help="Forbid repeating n-grams of this size.", rich_help_panel=_FLORENCE)] = None,
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter folder from `captionkit train captioner`.", rich_help_panel=_FLORENCE)] = None,
    prompt: Annotated[str | None, typer.Option(help="What to ask the model. May name fields of the image: 'Its tags: {tags}' (filled from `captionkit tag` results or manifest columns).", rich_help_panel=_CHAT)] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System instructions, for families that have a system role.", rich_help_panel=_CHAT)] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (default); above 0 samples.", rich_help_panel=_CHAT)] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling (with --temperature > 0).", rich_help_panel=_CHAT)] = None,
    top_k: Annotated[int | None, typer.Option(help="Top-k sampling (with --temperature > 0).", rich_help_panel=_CHAT)] = None,
    samples: Annotated[int | None, typer.Option(help="Captions per image, all kept in the store (see --sample-choice).", rich_help_panel=_CHAT)] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed: the same command with the same seed gives the same captions.", rich_help_panel=_CHAT)] = None,
    sample_choice: Annotated[str, typer.Option(help="With --samples: first, longest or all (joined by --sample-separator).", rich_help_panel=_CHAT)] = "first",
    sample_separator: Annotated[str, typer.Option(help="Between samples with --sample-choice all.", rich_help_panel=_CHAT)] = "\n",
    strip_openers: Annotated[bool, typer.Option(help="Remove filler openers ('The image shows', 'In this image,').", rich_help_panel=_CHAT)] = False,
    max_image_side: Annotated[int | None, typer.Option(help="Downscale images so the longest side is at most this (also for servers).", rich_help_panel=_CHAT)] = None,
    min_pixels: Annotated[int | None, typer.Option(help="Qwen2-VL family: smallest image area the processor resizes to.", rich_help_panel=_CHAT)] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Qwen2-VL family: largest image area (fewer image tokens, faster).", rich_help_panel=_CHAT)] = None,
    anyres: Annotated[bool | None, typer.Option("--anyres/--no-anyres", help="LLaVA-NeXT/OneVision: tile large images (default: as the model ships); --no-anyres = one tile, faster.", rich_help_panel=_CHAT)] = None,
    pan_and_scan: Annotated[bool | None, typer.Option("--pan-and-scan/--no-pan-and-scan", help="Gemma 3: add crops of wide or tall images.", rich_help_panel=_CHAT)] = None,
    longest_edge: Annotated[int | None, typer.Option(help="Idefics3/SmolVLM: longest image side the processor resizes to.", rich_help_panel=_CHAT)] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the model's own Python code (Phi-3-vision); only for models you trust. Recorded in the results.", rich_help_panel=_CHAT)] = False,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest caption in tokens (default 256).")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="Penalise repeated tokens (>1.0).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (bf16/fp16 on a GPU, fp32 on CPU), fp32, fp16, bf16. Part of the settings: a change re-captions.")] = "auto",
    attn_implementation: Annotated[str, typer.Option(help="sdpa, eager or flash_attention_2.")] = "sdpa",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="Folder for downloaded models.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    base_url: Annotated[str | None, typer.Option(help="Server address, e.g. http://127.0.0.1:8000/v1.", rich_help_panel=_SERVER)] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable that holds the API key (default OPENAI_API_KEY; never stored or logged).", rich_help_panel=_SERVER)] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight at once (default 8).", rich_help_panel=_SERVER)] = None,
    request_timeout: Annotated[float | None, typer.Option(help="Seconds per request before it is retried (default 120).", rich_help_panel=_SERVER)] = None,
    max_retries: Annotated[int | None, typer.Option(help="Retries per request on 429, 5xx, timeouts and dropped connections (default 5).", rich_help_panel=_SERVER)] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(help="GPUs per engine.", rich_help_panel=_VLLM)] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length of the engine.", rich_help_panel=_VLLM)] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Sequences the engine runs at once.", rich_help_panel=_VLLM)] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help="Fraction of GPU memory the engine may take (default 0.9).", rich_help_panel=_VLLM)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per model call, halved automatically on out-of-memory (default 8; 4 x --concurrency for servers).")] = None,
    workers: Annotated[int, typer.Option(help="Parallel decode/preprocess workers.")] = 4,
    recursive: Annotated[bool, typer.Option(help="Descend into sub-folders.")] = True,
    include_hidden: Annotated[bool, typer.Option(help="Also take files and folders whose names start with '.'.")] = False,
    image_column: Annotated[str | None, typer.Option(help="Manifest column with the image path.")] = None,
    base_dir: Annotated[Path | None, typer.Option(help="Folder that relative manifest paths start from.")] = None,
    output_dir: Annotated[str | None, typer.Option(metavar="PATH", help="Write captions into a mirrored tree here instead of beside the images (a folder or a URL; required for remote images).")] = None,
    ext: Annotated[str, typer.Option(help="Caption file extension (.txt, .caption, ...).")] = ".txt",
    existing: Annotated[str, typer.Option(help="Existing caption files: skip, overwrite, append or fill-empty.")] = "skip",
    on_collision: Annotated[str, typer.Option(help="Two images, one caption file (a.png + a.jpg): skip (write neither) or keep-extension (a.png.txt).")] = "skip",
    append_separator: Annotated[str, typer.Option(help="Put between the old and new text with --existing append.")] = ", ",
    prefix: Annotated[str, typer.Option(help="Text put before every caption, verbatim (e.g. 'ohwx, ').")] = "",
    suffix: Annotated[str, typer.Option(help="Text put after every caption, verbatim.")] = "",
    cleanup: Annotated[bool, typer.Option(help="Strip special tokens and extra whitespace.")] = True,
    collapse_loops: Annotated[bool, typer.Option(help="Collapse repeated-phrase loops.")] = True,
    background: Annotated[str, typer.Option(help="Colour transparent images are composited on.")] = "white",
    max_image_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels (decompression bombs).")] = 178_956_970,
    keep_results: Annotated[bool, typer.Option(help="Reuse stored captions even if made with other settings.")] = False,
    retry_errors: Annotated[bool, typer.Option(help="Retry images that failed before even if the file did not change.")] = False,
    export: Annotated[list[str] | None, typer.Option(metavar="PATH", help="Also write all results to this .jsonl or .parquet (repeatable; a path or a URL); a folder gets sharded Parquet (part-00000.parquet, ...).")] = None,
    write: Annotated[bool, typer.Option(help="Write caption files (--no-write: results only in the store and --export; for very large runs).")] = True,
    executor: Annotated[str, _EXECUTOR] = "local",
    ray_address: Annotated[str | None, _RAY_ADDRESS] = None,
    ray_actors: Annotated[int | None, _RAY_ACTORS] = None,
    ray_gpus_per_actor: Annotated[float | None, _RAY_GPUS] = None,
    ray_cpus_per_actor: Annotated[float, _RAY_CPUS] = 1.0,
    ray_stall_timeout: Annotated[float, _RAY_STALL] = 600.0,
    devices: Annotated[str | None, _DEVICES] = None,
    storage_options: Annotated[str | None, _STORAGE_OPTIONS] = None,
    io_workers: Annotated[int, _IO_WORKERS] = 16,
    max_failures: Annotated[str | None, typer.Option(help=_MAX_FAILURES_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    progress: Annotated[str, typer.Option(help="bar, json (JSON lines on stdout) or quiet.")] = "bar",
) -> None:
    """Caption every image (Florence-2, chat VLMs, an OpenAI-compatible server or vLLM); safe to stop and run again."""
    from captionkit import api
    from captionkit.core.exit_codes import parse_max_failures

    allowance = parse_max_failures(max_failures)  # a bad value fails before the model loads
    mode = "quiet" if quiet else progress
    options = api.ModelOptions(
        model=model, backend=backend, task=task, task_input=task_input, num_beams=num_beams,
        early_stopping=early_stopping or None, no_repeat_ngram_size=no_repeat_ngram_size, adapter=adapter,
        prompt=prompt, system_prompt=system_prompt, temperature=temperature, top_p=top_p, top_k=top_k,
        samples=samples, seed=seed, max_image_side=max_image_side, min_pixels=min_pixels, max_pixels=max_pixels,
        anyres=anyres, pan_and_scan=pan_and_scan, longest_edge=longest_edge, trust_remote_code=trust_remote_code, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
        dtype=dtype, attn_implementation=attn_implementation, device=device, cache_dir=cache_dir, revision=revision,
        base_url=base_url, api_key_env=api_key_env, concurrency=concurrency, request_timeout=request_timeout,
        max_retries=max_retries, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
        max_num_seqs=max_num_seqs, gpu_memory_utilization=gpu_memory_utilization,
    )
    summary = api.caption(
        path, options=options, batch_size=batch_size, workers=workers, recursive=recursive,
        include_hidden=include_hidden, image_column=image_column, base_dir=base_dir, output_dir=output_dir, ext=ext,
        existing=existing, on_collision=on_collision, append_separator=append_separator, prefix=prefix,
        suffix=suffix, cleanup=cleanup, collapse_loops=collapse_loops, strip_openers=strip_openers,
        sample_choice=sample_choice, sample_separator=sample_separator, background=background,
        max_image_pixels=max_image_pixels, keep_results=keep_results, retry_errors=retry_errors,
        write_sidecars=write, export=export or (), progress=mode, executor=executor, ray_address=ray_address,
        devices=devices, ray_actors=ray_actors, ray_gpus_per_actor=ray_gpus_per_actor,
        ray_cpus_per_actor=ray_cpus_per_actor, ray_stall_timeout=ray_stall_timeout,
        storage_options=storage_options, io_workers=io_workers,
    )
    _print_summary(summary, mode)
    _exit_for_summary(summary, allowance)


def _split_list(values: list[str] | None) -> list[str]:
    """Repeatable options that also accept comma-separated values."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        if "=" not in value:
            raise CaptionkitError(f"{option} {value!r}: write it as NAME=VALUE.")
        name, _, target = value.partition("=")
        pairs[name.strip()] = target.strip()
    return pairs


def _tag_options(general_threshold, character_threshold, threshold, use_model_thresholds, mcut, max_tags,
                 include_rating, blacklist, replace, always_first, underscores_to_spaces, escape_parentheses, order,
                 separator):
    from captionkit import api

    try:
        thresholds = {name: float(value) for name, value in _pairs(threshold, "--threshold").items()}
    except ValueError as error:
        raise CaptionkitError(f"--threshold: {error}; write it as CATEGORY=0.5") from error
    return api.tag_options(
        general_threshold=general_threshold, character_threshold=character_threshold, thresholds=thresholds,
        use_model_thresholds=use_model_thresholds, mcut=mcut, max_tags=max_tags, include_rating=include_rating,
        blacklist=_split_list(blacklist), replacements=_pairs(replace, "--replace"),
        always_first=_split_list(always_first), underscores_to_spaces=underscores_to_spaces,
        escape_parentheses=escape_parentheses, order=order, separator=separator,
    )


_GENERAL = typer.Option(help="Threshold for general tags.")
_CHARACTER = typer.Option(help="Threshold for character tags.")
_THRESHOLD = typer.Option(help="Per-category threshold, e.g. artist=0.5, copyright=0.6, meta=0.4 (repeatable).")
_MODEL_THRESHOLDS = typer.Option(help="Use the thresholds the model ships (per-tag tuned ones from captionkit training).")
_MCUT = typer.Option(help="Adaptive MCut threshold for general and character tags.")
_MAX_TAGS = typer.Option(help="Keep at most this many predicted tags (highest scores).")
_RATING = typer.Option(help="Add the most likely rating tag.")
_BLACKLIST = typer.Option(help="Tags never written (repeatable or comma-separated).")
_REPLACE = typer.Option(help="Rename a tag: OLD=NEW (repeatable; NEW empty removes it).")
_FIRST = typer.Option(help="Tags written first, added even when not predicted (repeatable or comma-separated).")
_UNDERSCORES = typer.Option(help="long_hair → long hair (kaomoji like ^_^ are kept).")
_ESCAPE = typer.Option(help="Escape parentheses: name_(series) → name_\\(series\\).")
_ORDER = typer.Option(help="score or name.")
_SEPARATOR = typer.Option(help="Between tags.")


@app.command(epilog=_EXIT_CODES)
def tag(
    path: Annotated[str, typer.Argument(help="Folder of images, one image, or a manifest; local or a URL (s3://, gs://, az://, hf://).")],
    model: Annotated[str, typer.Option(help="Tagger: WD-style hub repo or folder (model.onnx or timm weights + selected_tags.csv), or a folder from `captionkit train tagger`.")] = "SmilingWolf/wd-swinv2-tagger-v3",
    general_threshold: Annotated[float, _GENERAL] = 0.35,
    character_threshold: Annotated[float, _CHARACTER] = 0.85,
    threshold: Annotated[list[str] | None, _THRESHOLD] = None,
    use_model_thresholds: Annotated[bool, _MODEL_THRESHOLDS] = False,
    mcut: Annotated[bool, _MCUT] = False,
    max_tags: Annotated[int | None, _MAX_TAGS] = None,
    include_rating: Annotated[bool, _RATING] = False,
    blacklist: Annotated[list[str] | None, _BLACKLIST] = None,
    replace: Annotated[list[str] | None, _REPLACE] = None,
    always_first: Annotated[list[str] | None, _FIRST] = None,
    underscores_to_spaces: Annotated[bool, _UNDERSCORES] = True,
    escape_parentheses: Annotated[bool, _ESCAPE] = False,
    order: Annotated[str, _ORDER] = "score",
    separator: Annotated[str, _SEPARATOR] = ", ",
    print_scores: Annotated[bool, typer.Option("--print", help="Print 'image: tag: score' lines for the chosen tags.")] = False,
    write: Annotated[bool, typer.Option(help="Write tag files (--no-write with --print only prints).")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (a GPU asked for never falls back to CPU).")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="Folder for downloaded models.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call (halved automatically on out-of-memory).")] = 32,
    workers: Annotated[int, typer.Option(help="Parallel decode/preprocess workers.")] = 4,
    recursive: Annotated[bool, typer.Option(help="Descend into sub-folders.")] = True,
    include_hidden: Annotated[bool, typer.Option(help="Also take files and folders whose names start with '.'.")] = False,
    image_column: Annotated[str | None, typer.Option(help="Manifest column with the image path.")] = None,
    base_dir: Annotated[Path | None, typer.Option(help="Folder that relative manifest paths start from.")] = None,
    output_dir: Annotated[str | None, typer.Option(metavar="PATH", help="Write tag files into a mirrored tree here (a folder or a URL; required for remote images).")] = None,
    ext: Annotated[str, typer.Option(help="Tag file extension.")] = ".txt",
    existing: Annotated[str, typer.Option(help="Existing files: skip, overwrite, append or fill-empty.")] = "skip",
    on_collision: Annotated[str, typer.Option(help="a.png + a.jpg: skip or keep-extension.")] = "skip",
    append_separator: Annotated[str, typer.Option(help="Between old and new text with --existing append.")] = ", ",
    background: Annotated[str, typer.Option(help="Colour transparent images are composited on.")] = "white",
    max_image_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels (decompression bombs).")] = 178_956_970,
    keep_results: Annotated[bool, typer.Option(help="Reuse stored scores even if made by another model version.")] = False,
    retry_errors: Annotated[bool, typer.Option(help="Retry images that failed before even if unchanged.")] = False,
    export: Annotated[list[Path] | None, typer.Option(help="Also write all results to .jsonl or .parquet; a folder gets sharded Parquet.")] = None,
    executor: Annotated[str, _EXECUTOR] = "local",
    ray_address: Annotated[str | None, _RAY_ADDRESS] = None,
    ray_actors: Annotated[int | None, _RAY_ACTORS] = None,
    ray_gpus_per_actor: Annotated[float | None, _RAY_GPUS] = None,
    ray_cpus_per_actor: Annotated[float, _RAY_CPUS] = 1.0,
    ray_stall_timeout: Annotated[float, _RAY_STALL] = 600.0,
    devices: Annotated[str | None, _DEVICES] = None,
    storage_options: Annotated[str | None, _STORAGE_OPTIONS] = None,
    io_workers: Annotated[int, _IO_WORKERS] = 16,
    max_failures: Annotated[str | None, typer.Option(help=_MAX_FAILURES_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    progress: Annotated[str, typer.Option(help="bar, json (JSON lines on stdout) or quiet.")] = "bar",
) -> None:
    """Tag every image with a Danbooru-style tagger; all scores are stored for `captionkit render`."""
    from captionkit import api
    from captionkit.core.exit_codes import parse_max_failures

    allowance = parse_max_failures(max_failures)  # a bad value fails before the model loads
    options = _tag_options(general_threshold, character_threshold, threshold, use_model_thresholds, mcut, max_tags,
                           include_rating, blacklist, replace, always_first, underscores_to_spaces,
                           escape_parentheses, order, separator)
    mode = "quiet" if quiet or (print_scores and progress == "bar") else progress
    summary = api.tag(
        path, model=model, device=device, cache_dir=cache_dir, options=options, print_scores=print_scores,
        batch_size=batch_size, workers=workers, recursive=recursive, include_hidden=include_hidden,
        image_column=image_column, base_dir=base_dir, output_dir=output_dir, ext=ext, existing=existing,
        on_collision=on_collision, append_separator=append_separator, background=background,
        max_image_pixels=max_image_pixels, keep_results=keep_results, retry_errors=retry_errors,
        write_sidecars=write, export=export or (), progress=mode, executor=executor, ray_address=ray_address,
        devices=devices, ray_actors=ray_actors, ray_gpus_per_actor=ray_gpus_per_actor,
        ray_cpus_per_actor=ray_cpus_per_actor, ray_stall_timeout=ray_stall_timeout,
        storage_options=storage_options, io_workers=io_workers,
    )
    _print_summary(summary, mode)
    _exit_for_summary(summary, allowance)


@app.command()
def render(
    path: Annotated[Path, typer.Argument(help="The folder (or manifest) that was tagged or captioned.")],
    field: Annotated[str, typer.Option(help="tags or caption.")] = "tags",
    general_threshold: Annotated[float, _GENERAL] = 0.35,
    character_threshold: Annotated[float, _CHARACTER] = 0.85,
    threshold: Annotated[list[str] | None, _THRESHOLD] = None,
    use_model_thresholds: Annotated[bool, _MODEL_THRESHOLDS] = False,
    mcut: Annotated[bool, _MCUT] = False,
    max_tags: Annotated[int | None, _MAX_TAGS] = None,
    include_rating: Annotated[bool, _RATING] = False,
    blacklist: Annotated[list[str] | None, _BLACKLIST] = None,
    replace: Annotated[list[str] | None, _REPLACE] = None,
    always_first: Annotated[list[str] | None, _FIRST] = None,
    underscores_to_spaces: Annotated[bool, _UNDERSCORES] = True,
    escape_parentheses: Annotated[bool, _ESCAPE] = False,
    order: Annotated[str, _ORDER] = "score",
    separator: Annotated[str, _SEPARATOR] = ", ",
    prefix: Annotated[str, typer.Option(help="Captions only: text put before every caption.")] = "",
    suffix: Annotated[str, typer.Option(help="Captions only: text put after every caption.")] = "",
    cleanup: Annotated[bool, typer.Option(help="Captions only: strip special tokens and whitespace noise.")] = True,
    collapse_loops: Annotated[bool, typer.Option(help="Captions only: collapse repeated-phrase loops.")] = True,
    strip_openers: Annotated[bool, typer.Option(help="Captions only: remove filler openers ('The image shows').")] = False,
    sample_choice: Annotated[str, typer.Option(help="Captions only, with several samples: first, longest or all.")] = "first",
    sample_separator: Annotated[str, typer.Option(help="Captions only: between samples with --sample-choice all.")] = "\n",
    recursive: Annotated[bool, typer.Option(help="Descend into sub-folders.")] = True,
    image_column: Annotated[str | None, typer.Option(help="Manifest column with the image path.")] = None,
    base_dir: Annotated[Path | None, typer.Option(help="Folder that relative manifest paths start from.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="The --output-dir of the original run.")] = None,
    ext: Annotated[str, typer.Option(help="File extension.")] = ".txt",
    existing: Annotated[str, typer.Option(help="Files captionkit did not write: skip, overwrite, append or fill-empty.")] = "skip",
    on_collision: Annotated[str, typer.Option(help="a.png + a.jpg: skip or keep-extension.")] = "skip",
    append_separator: Annotated[str, typer.Option(help="Between old and new text with --existing append.")] = ", ",
) -> None:
    """Rewrite tag or caption files from the stored results with new settings, without running a model."""
    from captionkit import api

    options = _tag_options(general_threshold, character_threshold, threshold, use_model_thresholds, mcut, max_tags,
                           include_rating, blacklist, replace, always_first, underscores_to_spaces,
                           escape_parentheses, order, separator) if field == "tags" else None
    written = api.render(
        path, field=field, options=options, prefix=prefix, suffix=suffix, cleanup=cleanup,
        collapse_loops=collapse_loops, strip_openers=strip_openers, sample_choice=sample_choice,
        sample_separator=sample_separator, recursive=recursive, image_column=image_column, base_dir=base_dir,
        output_dir=output_dir, ext=ext, existing=existing, on_collision=on_collision,
        append_separator=append_separator,
    )
    print(f"{written} files rewritten", file=sys.stderr)


@app.command()
def models() -> None:
    """List the registered model backends."""
    from captionkit.models import list_backends

    for info in list_backends():
        default = f"; default model: {info.default_model}" if info.default_model else ""
        types = f"; model types: {', '.join(info.model_types)}" if info.model_types else ""
        if info.extras:
            state = "installed" if info.installed() else f"not installed: pip install 'captionkit[{','.join(info.extras)}]'"
            needs = f"; needs captionkit[{','.join(info.extras)}] ({state})"
        else:
            needs = "; included in the base install"
        print(f"{info.kind:10} {info.name:16} {info.description}{types}{default}{needs}")


@app.command("run", epilog=_EXIT_CODES.replace("every image", "every record").replace(
    "--max-failures", "--max-failures, per step"))
def run_command(
    pipeline: Annotated[Path | None, typer.Argument(help="A pipeline YAML file (captionkit's or Dataflow-Gen's spelling).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="The pipeline file, given as an option (as Dataflow-Gen's run_pipeline.py and the trainers take it).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Validate and show the plan: steps, records, what is already done.")] = False,
    from_step: Annotated[int | None, typer.Option(help="Start at this step (1-based); earlier steps' stored results are used.")] = None,
    only_step: Annotated[str | None, typer.Option(help="Run only the step with this name.")] = None,
    workers: Annotated[int, typer.Option(help="Parallel decode/preprocess workers.")] = 4,
    executor: Annotated[str, _EXECUTOR] = "local",
    ray_address: Annotated[str | None, _RAY_ADDRESS] = None,
    ray_actors: Annotated[int | None, _RAY_ACTORS] = None,
    ray_gpus_per_actor: Annotated[float | None, _RAY_GPUS] = None,
    ray_cpus_per_actor: Annotated[float, _RAY_CPUS] = 1.0,
    ray_stall_timeout: Annotated[float, _RAY_STALL] = 600.0,
    devices: Annotated[str | None, _DEVICES] = None,
    max_failures: Annotated[str | None, typer.Option(help="Still exit 0 when at most this many records fail in each step: a number (5) or a percentage of the records the step tried (2%). Default 0.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    progress: Annotated[str, typer.Option(help="bar, json or quiet.")] = "bar",
) -> None:
    """Run a multi-step pipeline (caption, tag, template, filter, generate, export); resumable per step and record."""
    from captionkit.core.exit_codes import OK, parse_max_failures, run_exit_code
    from captionkit.pipeline import run_pipeline

    if config is not None and pipeline is not None and config != pipeline:
        raise typer.BadParameter(f"two pipeline files ({pipeline} and --config {config}); give one.")
    pipeline = pipeline or config
    if pipeline is None:
        raise typer.BadParameter("give the pipeline file: captionkit run PIPELINE.yaml (or --config PIPELINE.yaml).")
    allowance = parse_max_failures(max_failures)  # a bad value fails before any model loads
    report = run_pipeline(pipeline, dry_run=dry_run, from_step=from_step, only_step=only_step,
                          progress="quiet" if quiet else progress, workers=workers, executor=executor,
                          ray_address=ray_address, devices=devices, ray_actors=ray_actors,
                          ray_gpus_per_actor=ray_gpus_per_actor, ray_cpus_per_actor=ray_cpus_per_actor,
                          ray_stall_timeout=ray_stall_timeout)
    stopped_early = report.stopped_early
    out = sys.stderr
    if report.path_rule:
        print(f"paths: {report.path_rule}", file=out)
    for step in report.steps:
        head = f"step {step.index} {step.name} ({step.type} -> {step.output_field})"
        if step.skipped:
            print(f"{head}: not run (--from-step/--only-step)", file=out)
        elif report.dry_run:
            print(f"{head}: {step.total} records, {step.done} done, {step.todo} to run, {step.failed} failed before"
                  + (f", {step.dropped} dropped by a filter" if step.dropped else ""), file=out)
        else:
            print(f"{head}: {step.processed} done, {step.done} already done, {step.failed} failed of {step.total} "
                  f"in {step.elapsed_s:.1f}s" + (f" ({step.dropped} dropped by a filter)" if step.dropped else ""),
                  file=out)
        errors = step.errors
        if stopped_early:  # its reason is said once, below, not once per record
            errors = {record_id: reason for record_id, reason in errors.items()
                      if reason.partition(": ")[2].rstrip(".") not in stopped_early}
        for record_id, reason in list(errors.items())[:20]:
            print(f"  failed  {_failure_line(record_id, reason)}", file=out)
        if len(errors) > 20:
            print(f"  ... and {len(errors) - 20} more (see the run log in base_folder/.captionkit)", file=out)
    if report.table is not None:
        print(f"final table: {report.table}", file=out)
    if stopped_early:
        print(stopped_early, file=out)
    codes = [run_exit_code(succeeded=step.processed + step.done, failed=step.failed, allowance=allowance)
             for step in report.steps if not step.skipped and not report.dry_run]
    code = run_exit_code(succeeded=1, failed=0, allowance=allowance, stopped_early=bool(stopped_early),
                         interrupted=report.interrupted)
    if code == OK and codes:
        code = max(codes)  # 3 (a step where nothing succeeded) outranks 1 (some failed)
    if code != OK:
        raise typer.Exit(code)


_INSPECT_EXIT_CODES = ("Exit codes: 0 inspected (findings are in the reports); 1 findings named by --fail-on; "
                       "2 usage error, or no images found; 3 no image could be read; 130 Ctrl-C.")


@app.command("inspect", epilog=_INSPECT_EXIT_CODES)
def inspect_command(
    dataset: Annotated[Path, typer.Argument(help="Image folder (with sidecar captions/tags) or a manifest (jsonl/json/csv/tsv/parquet).")],
    report: Annotated[Path | None, typer.Option(help="Write the self-contained HTML report (plots, tables linking to files) here.")] = None,
    json_report: Annotated[Path | None, typer.Option("--json", help="Write the findings as JSON here (for scripts and CI).")] = None,
    fail_on: Annotated[list[str] | None, typer.Option(help="Exit 1 when any of these are found: finding kinds, a severity (error, warning, info: that or worse) or any (repeatable or comma-separated).")] = None,
    trigger: Annotated[str | None, typer.Option(help="Trigger word every caption must contain.")] = None,
    resolution: Annotated[str, typer.Option(help="Training resolution for buckets: 1024 or WIDTHxHEIGHT.")] = "1024",
    min_bucket: Annotated[int, typer.Option(help="Smallest bucket side (kohya min_bucket_reso).")] = 256,
    max_bucket: Annotated[int, typer.Option(help="Largest bucket side (kohya max_bucket_reso).")] = 2048,
    bucket_step: Annotated[int, typer.Option(help="Bucket side step (kohya bucket_reso_steps).")] = 64,
    min_side: Annotated[int | None, typer.Option(help="Images whose shorter side is below this are tiny (default: --min-bucket).")] = None,
    max_crop: Annotated[float, typer.Option(help="Odd aspect ratio: more than this share of the image cropped to fit its bucket.")] = 0.10,
    full: Annotated[bool, typer.Option("--full", help="Decode every image (finds truncated data; slower).")] = False,
    near_duplicates: Annotated[bool, typer.Option(help="Perceptual hashes for near-duplicates (a reduced decode); --no-near-duplicates reads headers only.")] = True,
    near_duplicate_distance: Annotated[int, typer.Option(help="Near-duplicate threshold: Hamming distance of the 64-bit perceptual hashes.")] = 6,
    min_count: Annotated[int, typer.Option(help="Tags on fewer images than this are the long tail.")] = 3,
    common_fraction: Annotated[float, typer.Option(help="Tags on at least this share of the tagged images are reported.")] = 0.95,
    caption_ext: Annotated[str, typer.Option(help="Caption file extension.")] = ".txt",
    tag_ext: Annotated[str | None, typer.Option(help="Tag file extension (may equal --caption-ext); tags in the store are used where there are some.")] = None,
    selected_tags: Annotated[Path | None, typer.Option(help="A selected_tags.csv giving tag categories (the store's tagger vocabulary is used too).")] = None,
    t5_tokenizer: Annotated[Path | None, typer.Option(help="A T5 tokenizer (folder, tokenizer.json or spiece.model) for T5 token counts; default: the hub cache, if it has one.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="The --output-dir the captions were written to (store and sidecars there).")] = None,
    recursive: Annotated[bool, typer.Option(help="Descend into sub-folders.")] = True,
    include_hidden: Annotated[bool, typer.Option(help="Also take files and folders whose names start with '.'.")] = False,
    image_column: Annotated[str | None, typer.Option(help="Manifest column with the image path.")] = None,
    base_dir: Annotated[Path | None, typer.Option(help="Folder that relative manifest paths start from.")] = None,
    workers: Annotated[int, typer.Option(help="Parallel image readers.")] = 4,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    progress: Annotated[str, typer.Option(help="bar, json (JSON lines on stdout) or quiet.")] = "bar",
) -> None:
    """Find what would spoil a training run (captions, images, tags) without changing the data set; HTML and JSON reports."""
    from captionkit import api
    from captionkit.inspection import KINDS, resolve_fail_on

    try:
        resolve_fail_on(fail_on or [])  # a typo fails before the inspection, not after
    except ValueError as error:
        raise CaptionkitError(str(error)) from error
    result = api.inspect(
        dataset, trigger=trigger, resolution=resolution,
        min_bucket=min_bucket, max_bucket=max_bucket, bucket_step=bucket_step, min_side=min_side, max_crop=max_crop,
        full=full, near_duplicates=near_duplicates, near_duplicate_distance=near_duplicate_distance,
        min_count=min_count, common_fraction=common_fraction, caption_ext=caption_ext, tag_ext=tag_ext,
        selected_tags=selected_tags, t5_tokenizer=t5_tokenizer, output_dir=output_dir, recursive=recursive,
        include_hidden=include_hidden, image_column=image_column, base_dir=base_dir, workers=workers,
        progress="quiet" if quiet else progress,
    )
    if not result.counts["images"]:  # as caption and tag say it: one sentence, exit 2
        from captionkit.core.records import open_source

        source = open_source(dataset, recursive=recursive, image_column=image_column, base_dir=base_dir,
                             include_hidden=include_hidden)
        raise CaptionkitError(api.no_images_message(source))
    if report is not None:
        result.write_html(report)
    if json_report is not None:
        result.write_json(json_report)
    out = sys.stderr
    counts = result.counts
    print(f"{counts['images']} images ({counts['unreadable_images']} unreadable), {counts['with_caption']} captioned, "
          f"{counts['tagged']} tagged; {len(result.findings)} findings in {result.elapsed_s:.1f}s", file=out)
    for name, found in result.summary().items():
        if found:
            print(f"  {KINDS[name].severity:8} {name:26} {found:6}  {KINDS[name].title}", file=out)
    for path in (report, json_report):
        if path is not None:
            print(f"wrote {path}", file=out)
    failures = result.failures(fail_on or [])
    if failures:
        kinds = sorted({finding.kind for finding in failures})
        print(f"failing (--fail-on): {len(failures)} findings of {', '.join(kinds)}", file=out)
        raise typer.Exit(1)
    if counts["unreadable_images"] >= counts["images"]:
        print(f"none of the {counts['images']} images could be read: nothing was inspected", file=out)
        raise typer.Exit(3)


@app.command("ui")
def ui_command(
    host: Annotated[str, typer.Option(help="Address to listen on. 127.0.0.1 = this machine only; 0.0.0.0 = every network (use --auth).")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: 7860, or the next free one).")] = None,
    auth: Annotated[str | None, typer.Option(help="USER:PASS, or a file with one USER:PASS per line: the page asks for them.")] = None,
    share: Annotated[bool, typer.Option(help="Also publish a temporary public gradio.live link (off by default; use --auth).")] = False,
) -> None:
    """Open the web UI: caption, tag, train, run pipelines and review a data set in the browser."""
    from captionkit.ui import launch

    launch(host=host, port=port, auth=auth, share=share)


@app.command("export")
def export_command(
    location: Annotated[str, typer.Argument(help="The captioned folder (or the --output-dir used, a URL included).")],
    destination: Annotated[str, typer.Argument(help="A .jsonl or .parquet file to write (a path or a URL such as s3://bucket/out.parquet).")],
    step: Annotated[list[str] | None, typer.Option(help="Only these fields (caption, tags); default all.")] = None,
    storage_options: Annotated[str | None, _STORAGE_OPTIONS] = None,
) -> None:
    """Export every stored result (text, raw output, errors, settings) to JSONL or Parquet."""
    from captionkit import api

    count = api.export(location, destination, step, storage_options=storage_options)
    print(f"wrote {count} rows to {destination}", file=sys.stderr)


def _register_training_commands() -> None:
    """Training commands live with the trainers; their modules import heavy packages lazily."""
    from captionkit.train.captioner_cli import merge_lora_command
    from captionkit.train.cli import train_app
    from captionkit.train.tagger_cli import prepare_command

    app.add_typer(train_app, name="train")
    app.command("merge-lora", help="Merge a LoRA adapter into its base model: a standalone folder.")(
        merge_lora_command
    )
    app.command("prepare", help="Build image/tag pairs and selected_tags.csv from a Danbooru-style parquet.")(
        prepare_command
    )


_register_training_commands()


def _plain_metavars(command) -> None:
    """Help reads like plain Click: `--batch-size INTEGER`, bare flags, `Usage: ... PATH`, defaults on one line.

    Typer's own labels (`<int>`, `--help <bool>`, `{path}` in the usage line) and a default such
    as a newline printed raw (it breaks the option's row) are replaced here.
    """
    from typer.core import TyperArgument, TyperOption

    labels = {bool: "", int: "INTEGER", float: "NUMBER", str: "TEXT"}
    help_option = command.get_help_option(typer.Context(command))
    if help_option is not None:
        help_option.metavar = ""
    for param in command.params:
        if isinstance(param, TyperArgument):
            _plain_argument(param)
            continue
        if isinstance(param, TyperOption) and isinstance(param.default, str) and _needs_quotes(param.default):
            param._get_default_string = lambda *, ctx, show_default_is_str, default_value: repr(default_value)
        if param.metavar is not None:
            continue
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
            continue
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is None:
            continue
        annotation = descriptor.annotation
        if descriptor.is_list:  # a repeatable option takes one value each time: no '...'
            annotation = getattr(annotation, "__args__", (str,))[0]
        is_path = descriptor.is_path or (isinstance(annotation, type) and issubclass(annotation, Path))
        param.metavar = "PATH" if is_path else labels.get(annotation, "VALUE")
    for child in getattr(command, "commands", {}).values():
        _plain_metavars(child)


def _plain_argument(param) -> None:
    """`PATH` in the usage line and the Arguments panel (Typer prints `{path}`), `[PATH]` when optional."""
    name = (param.metavar or param.name or "value").upper()
    param.metavar = name
    param.display_type_rich = lambda ctx: None  # its name already says what it is
    usage = name if param.required else f"[{name}]"
    if param.nargs != 1:
        usage += "..."
    param.get_usage_pieces = lambda ctx: [usage]


def _needs_quotes(value: str) -> bool:
    """A default that prints as nothing, breaks the help row (a newline) or hides spaces is shown quoted."""
    return value != value.strip() or not value.isprintable()


def main() -> None:
    """Console entry point: user errors become one plain message, not a stack trace."""
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger().addHandler(console)
    for noisy in ("httpx", "httpcore", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        command = typer.main.get_command(app)
        try:
            _plain_metavars(command)
        except (AttributeError, ImportError, TypeError):  # another Typer version: its own labels are fine
            pass
        command(prog_name="captionkit")
    except CaptionkitError as error:
        from captionkit.core.exit_codes import exit_code_for

        print(f"error: {error}", file=sys.stderr)
        sys.exit(exit_code_for(error))  # 2, or 3 when nothing succeeded
    except sqlite3.Error as error:  # the store: a full disk, a read-only or corrupt store.sqlite
        from captionkit.core.environment import is_storage_problem

        hint = (" Check free space and permissions, or write elsewhere with --output-dir."
                if is_storage_problem(error) else "")
        print(f"error: the captionkit store (.captionkit/store.sqlite in the output folder) failed: {error}.{hint}",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - only named causes become messages; the rest re-raise
        from captionkit.core.environment import broken_environment, describe_os_error

        broken = broken_environment(error)
        if broken is not None:  # a package that fails to import: the environment, never the user's files
            print(f"error: {broken}", file=sys.stderr)
            sys.exit(2)
        if isinstance(error, OSError):  # the disk-space hint only where the error is about writing
            print(f"error: {describe_os_error(error)}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["app", "json", "main"]
