"""Every command in README.md and docs/*.md works as written, and every --help reads plainly.

The fenced shell blocks are extracted; each `captionkit ...` command is parsed against the
real CLI (every option must exist for that subcommand, values must convert, closed value
sets such as --fail-on kinds must hold). Those that can run here are then run as written,
in a fresh folder of generated images, with the hub ids they name served from a Hugging
Face cache filled with tiny random-weight models (so the command text is not changed).
Those that need what this machine lacks (a GPU, vLLM, a Ray cluster, a server, the hub)
are only parsed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}

# What a command needs that this machine does not have: such commands are parsed, not run.
NOT_HERE = {
    "--executor": "a Ray cluster (started here it would take minutes)",
    "--devices": "several GPUs",
    "--backend": "an OpenAI-compatible server or vLLM (CUDA)",
    "ui": "a browser session (tests/test_ui_browser.py drives the UI)",
    "prepare": "a Danbooru metadata parquet",
    "train tagger": "a timm backbone from the hub (convnext_tiny, pretrained: hub)",
}


def _shell_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of every fenced shell block, with backslash continuations joined."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, language, start, body = [], None, 0, []
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            if language is None:
                language, start, body = line[3:].strip() or "-", number, []
            else:
                if language in SHELL_LANGUAGES:
                    found.append((start, "\n".join(body).replace("\\\n", " ")))
                language = None
            continue
        if language is not None:
            body.append(line)
    return found


def doc_commands() -> list[tuple[str, list[str]]]:
    """``("README.md:32", ["caption", "photos/", ...])`` for every captionkit command in the docs."""
    commands = []
    for path in DOCUMENTS:
        for start, block in _shell_blocks(path):
            for offset, line in enumerate(block.splitlines(), 1):
                words = shlex.split(line, comments=True)
                if "--" in words and "captionkit" in words[words.index("--"):]:  # ray job submit -- captionkit ...
                    words = words[words.index("--") + 1:]
                if words[:1] == ["./run.sh"] and words[1:2] != ["test"]:
                    words = ["captionkit", *words[1:]]  # run.sh hands everything but `test` to captionkit
                if words[:1] == ["captionkit"]:
                    commands.append((f"{path.relative_to(ROOT)}:{start + offset}", words[1:]))
    return commands


COMMANDS = doc_commands()


def test_the_docs_have_commands_to_check():
    """The extraction finds the documented commands (an empty list would pass every check below)."""
    places = {place.split(":")[0] for place, _ in COMMANDS}
    assert len(COMMANDS) >= 40 and places >= {"README.md", "docs/scaling.md", "docs/vllm.md"}, COMMANDS


def _cli_command(words: list[str]):
    """The Click command a documented line names, and its remaining arguments (as `main` builds the CLI)."""
    import typer

    from captionkit.cli import _plain_metavars, app

    command = typer.main.get_command(app)
    _plain_metavars(command)
    rest = list(words)
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    return command, rest


@pytest.mark.parametrize(("place", "words"), COMMANDS, ids=[place for place, _ in COMMANDS])
def test_every_documented_command_parses(place, words):
    """Every option exists for its subcommand and every value converts (Click's own parsing, nothing run)."""
    import click

    from captionkit.inspection import resolve_fail_on

    command, rest = _cli_command(words)
    assert not hasattr(command, "commands"), f"{place}: `captionkit {' '.join(words)}` names no command"
    try:
        context = command.make_context(f"captionkit {words[0]}", rest)
    except click.ClickException as error:
        pytest.fail(f"{place}: `captionkit {shlex.join(words)}`: {error.format_message()}")
    if "fail_on" in context.params:  # checked by the command body, before the inspection runs
        resolve_fail_on(context.params["fail_on"] or [])


def _why_not_here(words: list[str]) -> str | None:
    joined = " ".join(words)
    if any(scheme in word for word in words for scheme in ("s3://", "gs://", "az://", "hf://")) \
            or "--storage-options" in words:  # a URL in a --set value, or a pipeline file naming a bucket
        return "a bucket (tests/test_object_storage.py, test_remote_commands.py run these against a moto S3 server)"
    for marker, why in NOT_HERE.items():
        if (marker.startswith("--") and marker in words) or joined == marker or joined.startswith(marker + " "):
            return why
    return None


# -- running them ------------------------------------------------------------------------------------------------

TINY_HUB_MODELS = ("florence-community/Florence-2-base", "SmilingWolf/wd-swinv2-tagger-v3", "llava-hf/llava-1.5-7b-hf",
                   "Qwen/Qwen2-VL-7B-Instruct", "fancyfeast/llama-joycaption-beta-one-hf-llava")
LOCAL_FLORENCE = ("my-finetune", "runs/florence-full/final")
LOCAL_TAGGERS = ("my-tagger", "wd-folder", "runs/tagger/best")
# Commands that read what an earlier command of the same docs wrote: run that one first, in the same folder.
TAGGED_FIRST = ["tag", "photos/", "--model", "SmilingWolf/wd-swinv2-tagger-v3", "--general-threshold", "0"]
CAPTIONED_FIRST = ["caption", "photos/"]
TRAINED_FIRST = ["train", "captioner", "--config", "examples/captioner.yaml"]
PIPELINE_FIRST = ["run", "examples/pipeline.yaml"]
SHARDS_CAPTIONED_FIRST = ["caption", "shards/shard-{00000..00001}.tar", "--output-dir", "captioned/"]


def _prerequisites(words: list[str]) -> list[list[str]]:
    joined = " ".join(words)
    if "{tags}" in joined or words[:2] == ["render", "photos/"] and "--general-threshold" in words:
        return [TAGGED_FIRST]
    if words[:2] == ["export", "captioned/"]:  # the WebDataset example: its shards captioned first
        return [SHARDS_CAPTIONED_FIRST]
    if words[0] in ("export", "render"):
        return [CAPTIONED_FIRST]
    if "--resume" in words:  # a run stopped after its first checkpoint
        return [[*TRAINED_FIRST, "--set", "epochs=1", "--set", "save_every_steps=1"]]
    if "runs/florence-lora/final" in words:
        return [TRAINED_FIRST]
    if "./lora-run/final" in words:
        return [[*TRAINED_FIRST, "--set", "output_dir=lora-run"]]
    if words[0] == "run" and ("--from-step" in words or "--only-step" in words):
        return [PIPELINE_FIRST]
    return []


def _put_in_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Make ``repo_id`` resolve offline to ``folder``'s files, the way a download would have stored them."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    shutil.copytree(folder, root / "snapshots" / revision)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)


def _tiny_tagger(folder: Path) -> Path:
    from safetensors.torch import save_file

    from tests.test_taggers_formats import SIZE, TAG_ROWS, tiny_model, write_tags_csv

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architecture": "test_convnext", "num_classes": len(TAG_ROWS), "model_args": {},
        "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "interpolation": "bicubic", "crop_pct": 1.0,
                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": len(TAG_ROWS)}}))
    save_file({key: value.contiguous() for key, value in tiny_model(5).state_dict().items()},
              str(folder / "model.safetensors"))
    write_tags_csv(folder / "selected_tags.csv")
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_florence) -> Path:
    """A template folder (images, manifests, examples/, tiny local models) and a hub cache of tiny models."""
    import pandas as pd

    from captionkit.testing.vlms.llava import build_joycaption, build_llava
    from captionkit.testing.vlms.qwen_vl import build_qwen2_vl
    from tests.images import write_good_images

    base = tmp_path_factory.mktemp("docs")
    models = base / "models"
    tagger = _tiny_tagger(models / "tagger")
    built = {"florence-community/Florence-2-base": tiny_florence, "SmilingWolf/wd-swinv2-tagger-v3": tagger,
             "llava-hf/llava-1.5-7b-hf": build_llava(models / "llava"),
             "Qwen/Qwen2-VL-7B-Instruct": build_qwen2_vl(models / "qwen2-vl"),
             "fancyfeast/llama-joycaption-beta-one-hf-llava": build_joycaption(models / "joycaption")}
    for repo_id in TINY_HUB_MODELS:
        _put_in_hub_cache(base / "hub", repo_id, built[repo_id])
    template = base / "template"
    # One or two images each: a documented command runs with its own settings (Florence-2's 3 beams and
    # 256 new tokens; a tiny random model rarely stops early), so every image costs seconds.
    write_good_images(template / "photos", 2)
    write_good_images(template / "data", 1)
    write_good_images(template / "path" / "to" / "images", 1)
    write_good_images(template / "examples" / "datasets" / "my-images", 1)  # pipeline.yaml: from its folder
    write_good_images(template / "datasets" / "my-images", 2)  # captioner.yaml: from the working folder
    from tests.test_webdataset import write_shards

    write_shards(template / "shards", 2, per_shard=1)  # the WebDataset example: shard-00000.tar, shard-00001.tar
    for number, image in enumerate(sorted((template / "datasets" / "my-images").iterdir())):
        image.with_suffix(".txt").write_text(f"a photo of thing number {number}")
    for source in ("pipeline.yaml", "captioner.yaml", "tagger.yaml"):
        shutil.copy(ROOT / "examples" / source, template / "examples" / source)
    images = sorted(path.name for path in (template / "data").iterdir())
    pd.DataFrame({"file": images}).to_csv(template / "list.csv", index=False)
    pd.DataFrame({"image": [str(template / "photos" / name) for name in sorted(os.listdir(template / "photos"))]}
                 ).to_parquet(template / "list.parquet")
    for name in LOCAL_FLORENCE:
        shutil.copytree(tiny_florence, template / name)
    for name in LOCAL_TAGGERS:
        shutil.copytree(tagger, template / name)
    return base


_DRIVER = """
import contextlib, io, json, os, sys, time
from captionkit.cli import main
for folder, words in json.loads(sys.stdin.read()):
    os.chdir(folder)
    sys.argv = ["captionkit", *words]
    stream = io.StringIO()
    code, started = 0, time.monotonic()
    with contextlib.redirect_stderr(stream):
        try:
            main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException as error:  # noqa: BLE001 - reported to the test, which fails on it
            import traceback
            traceback.print_exc(file=stream)
            code = 99
    print(json.dumps({"folder": folder, "words": words, "code": code, "stderr": stream.getvalue(),
                      "seconds": round(time.monotonic() - started, 1)}), flush=True)
"""


def _substitute_paths(words: list[str], folder: Path) -> list[str]:
    """Absolute example paths of the docs (/data) point into the generated folder."""
    return [str(folder / word[1:]) if word == "/data" or word.startswith("/data/") else word for word in words]


@pytest.mark.slow
def test_documented_commands_that_can_run_here_run_as_written(workspace, tmp_path):
    """Each runnable command, in a fresh copy of the generated folder: exit 0 (or 1 for a --fail-on finding),
    nothing failed, no traceback. One process runs them all (the CLI's own main, as the console script).
    Commands that need the same earlier command (a training run, a captioned folder) go on, in the docs'
    order, in the folder where it ran once, as a reader following the docs would: it is not run again."""
    runnable = [(place, words) for place, words in COMMANDS if _why_not_here(words) is None]
    assert len(runnable) >= 20, runnable
    models = {words[index + 1] for _, words in runnable for index, word in enumerate(words[:-1])
              if word == "--model" and not (workspace / "template" / words[index + 1]).exists()}
    assert models <= set(TINY_HUB_MODELS), f"add a tiny model to the hub cache for {models - set(TINY_HUB_MODELS)}"
    jobs, places, ran_in = [], {}, {}  # ran_in: the prerequisites (JSON) that ran → the folder they ran in
    for index, (place, words) in enumerate(runnable):
        before = _prerequisites(words)
        folder = ran_in.get(json.dumps(before)) if before else None
        if folder is None:
            folder = tmp_path / f"{index:02d}"
            shutil.copytree(workspace / "template", folder, symlinks=True)
            jobs.extend((str(folder), command) for command in before)
            if before:
                ran_in[json.dumps(before)] = folder
        ran_in.setdefault(json.dumps([words]), folder)  # a later command that needs this one first goes on here
        jobs.append((str(folder), _substitute_paths(words, folder)))
        places[(str(folder), json.dumps(jobs[-1][1]))] = place
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(workspace / "hub"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env.pop("HF_HOME", None)
    done = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(jobs), capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(jobs), done.stderr[-3000:]
    problems = []
    for result in results:
        place = places.get((result["folder"], json.dumps(result["words"])), "(set-up)")
        allowed = {0, 1} if "--fail-on" in result["words"] else {0}
        failed = [int(count) for count in re.findall(r"(\d+) failed", result["stderr"])]
        if result["code"] not in allowed or any(failed) or "Traceback" in result["stderr"]:
            problems.append(f"{place}: captionkit {shlex.join(result['words'])} -> exit {result['code']}\n"
                            f"{result['stderr'][-1500:]}")
    slowest = sorted(results, key=lambda result: -result["seconds"])[:5]
    print("slowest:", [(result["seconds"], shlex.join(result["words"])) for result in slowest])
    assert not problems, "\n\n".join(problems)


# -- help --------------------------------------------------------------------------------------------------------

def _every_command_path() -> list[list[str]]:
    import typer

    from captionkit.cli import app

    paths = []

    def walk(command, prefix):
        paths.append(prefix)
        for name, child in sorted(getattr(command, "commands", {}).items()):
            walk(child, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_help_of_every_command_reads_plainly():
    """`captionkit ... --help` as users see it (the console entry point, 100 columns): usage lines show
    PATH not {path}, repeatable options one VALUE not VALUE..., no <int> labels, and no default breaks its row."""
    paths = _every_command_path()
    assert ["caption"] in paths and ["train", "captioner"] in paths and ["export"] in paths
    script = ("import sys, json\nfrom captionkit.cli import main\n"
              "for words in json.loads(sys.argv[1]):\n"
              "    sys.argv = ['captionkit', *words, '--help']\n"
              "    print('=== ' + ' '.join(words), flush=True)\n"
              "    try:\n        main()\n    except SystemExit as stop:\n"
              "        print('=== exit', stop.code, flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(paths)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "100", "TERM": "dumb",
                                            "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    pages = re.split(r"^=== (?!exit)", done.stdout, flags=re.M)[1:]
    assert len(pages) == len(paths)
    for page in pages:
        name, _, text = page.partition("\n")
        assert "=== exit 0" in text, (name, text[-500:])
        usage = next(line for line in text.splitlines() if "Usage:" in line)
        assert "{" not in usage and "}" not in usage, (name, usage)
        assert not re.search(r"[A-Z]+\.\.\.", text.replace("COMMAND [ARGS]...", "")), (name, text)
        assert not re.search(r"<(int|float|str|bool|path|text)>", text, flags=re.I), (name, text)
        for line in text.splitlines():  # a row of a help box: '│ ... │'; a broken row leaves a bare ']'
            stripped = line.strip("│ ").strip()
            assert stripped not in ("]", ")"), (name, text)
        if name == "caption":
            row = next(line for line in text.splitlines() if "--sample-separator" in line)
            assert "[default: '\\n']" in row or "default: '\\n'" in text, text
            export_row = next(line for line in text.splitlines() if "--export" in line)
            assert re.search(r"--export\s+PATH\s", export_row), export_row
    for name, argument in (("caption", "PATH"), ("run", "[PIPELINE]"), ("export", "LOCATION DESTINATION")):
        page = next(page for page in pages if page.startswith(name + "\n"))
        assert f"captionkit {name} [OPTIONS] {argument}" in page, page[:400]
