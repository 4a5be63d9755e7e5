"""The example files in examples/ stay valid as the config classes change, and run as shipped."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from captionkit.train.captioner import load_captioner_config
from captionkit.train.tagger import load_tagger_config
from tests.images import write_good_images

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_captioner_example_loads_and_overrides_apply():
    config = load_captioner_config(EXAMPLES / "captioner.yaml", ["optimizer.lr=5e-5"])
    assert config.mode == "lora" and config.lora.rank == 16 and config.optimizer.lr == 5e-5
    assert config.data[0].task == "<MORE_DETAILED_CAPTION>"


def test_tagger_example_loads_and_overrides_apply():
    config = load_tagger_config(EXAMPLES / "tagger.yaml", ["optimizer.lr=1e-4"])
    assert config.model.backbone == "convnext_tiny" and config.loss.name == "asl" and config.optimizer.lr == 1e-4
    assert config.data.min_count == 50


# -- the shipped files, run as written in a fresh process --------------------------------------------------------

ROOT = EXAMPLES.parent


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_florence) -> Path:
    """A Hugging Face cache in which every hub id of examples/ resolves offline to a tiny model."""
    from captionkit.testing.vlms.llava import build_llava
    from tests.test_docs import _put_in_hub_cache, _tiny_tagger

    base = tmp_path_factory.mktemp("examples-hub")
    models = {"florence-community/Florence-2-base": tiny_florence,
              "SmilingWolf/wd-swinv2-tagger-v3": _tiny_tagger(base / "tagger"),
              "llava-hf/llava-1.5-7b-hf": build_llava(base / "llava")}
    shipped = {step["config"]["model"] for step in yaml.safe_load((EXAMPLES / "pipeline.yaml").read_text())["steps"]
               if "model" in step["config"]}
    shipped.add(yaml.safe_load((EXAMPLES / "captioner.yaml").read_text())["model"])
    assert shipped <= set(models), f"add a tiny model for {shipped - set(models)}"
    for repo_id, folder in models.items():
        _put_in_hub_cache(base / "hub", repo_id, folder)
    return base / "hub"


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory, hub_cache) -> dict:
    """Every shipped example command, run as written by the CLI's own ``main`` in one fresh interpreter (nothing
    repaired or imported beforehand; umask 022), each in its own folder: the pipeline's --dry-run first, so its
    filter step's open_clip is the first to import torchvision. One process, as tests/test_docs.py does: the
    interpreter's start and imports are paid once, not six times. Returns each command's folder and result."""
    from captionkit.train.tagger_synthetic import write_selected_tags, write_shapes_dataset
    from tests.test_docs import _DRIVER

    base = tmp_path_factory.mktemp("examples-run")
    folders = {name: base / name for name in ("pipeline", "captioner", "tagger")}
    for folder in folders.values():
        shutil.copytree(EXAMPLES, folder / "examples")
    write_good_images(folders["pipeline"] / "examples" / "datasets" / "my-images", 3)
    images = write_good_images(folders["captioner"] / "datasets" / "my-images", 4)  # the config's path, from the
    for number, image in enumerate(images):  # working folder
        image.with_suffix(".txt").write_text(f"a photo of thing number {number}")
    write_shapes_dataset(folders["tagger"] / "datasets" / "danbooru" / "images", 24)
    write_selected_tags(folders["tagger"] / "datasets" / "danbooru" / "selected_tags.csv")
    commands = {
        "pipeline plan": ("pipeline", ["run", "examples/pipeline.yaml", "--dry-run"]),
        "pipeline run": ("pipeline", ["run", "examples/pipeline.yaml", "--quiet"]),
        "pipeline rerun": ("pipeline", ["run", "examples/pipeline.yaml", "--quiet"]),
        "captioner": ("captioner", ["train", "captioner", "--config", "examples/captioner.yaml", "--set",
                                    "save_every_steps=2"]),
        "merge": ("captioner", ["merge-lora", "--adapter", "runs/florence-lora/final", "-o", "merged"]),
        # examples/tagger.yaml with only what needs the hub or hours changed (backbone, image size, epochs)
        "tagger": ("tagger", ["train", "tagger", "--config", "examples/tagger.yaml",
                              "--set", "model.backbone=test_convnext", "--set", "model.pretrained=none",
                              "--set", "model.image_size=32", "--set", "epochs=1", "--set", "batch_size=8"]),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "PYTHONPATH": str(ROOT / "src")}
    env.pop("HF_HOME", None)
    jobs = [(str(folders[place]), words) for place, words in commands.values()]
    done = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(jobs), capture_output=True, text=True,
                          env=env, timeout=900, preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(jobs), done.stderr[-3000:]
    return {"folders": folders, **dict(zip(commands, results, strict=True))}


def _ok(result: dict) -> bool:
    return result["code"] == 0 and "Traceback" not in result["stderr"]


def _modes_not_plain(folder: Path) -> list[str]:
    """Files not 0644 and folders not 0755 under ``folder`` (what open() and mkdir() give under umask 022)."""
    wrong = []
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            continue
        if mode != (0o755 if path.is_dir() else 0o644):
            wrong.append(f"{oct(mode)} {path.relative_to(folder)}")
    return wrong


def test_the_example_pipeline_runs_as_written_in_a_fresh_process(example_runs):
    """examples/pipeline.yaml unchanged (its hub ids served by tiny models): --dry-run, then the run, then a rerun.

    A fresh process matters: the filter step imports open_clip, which imports torchvision before anything
    else did; the torchvision repair must cover that path too."""
    plan, first, again = (example_runs[name] for name in ("pipeline plan", "pipeline run", "pipeline rerun"))
    assert _ok(plan), plan["stderr"][-3000:]
    assert plan["stderr"].count("3 records") == 7, plan["stderr"]
    assert _ok(first), first["stderr"][-3000:]
    assert "0 failed of 3" in first["stderr"] and " 1 failed" not in first["stderr"], first["stderr"]
    output = example_runs["folders"]["pipeline"] / "examples" / "runs" / "pipeline-output"
    assert (output / "result.jsonl").is_file() and (output / "imagefolder" / "metadata.jsonl").is_file()
    assert _ok(again) and "0 done, 3 already done" in again["stderr"], again["stderr"]


@pytest.mark.slow
def test_the_example_captioner_trains_as_written_and_its_files_are_readable(example_runs):
    """examples/captioner.yaml unchanged (the base model served by a tiny Florence-2): a LoRA run, then
    merge-lora. Every file gets the mode a plain open() gives under umask 022 (safetensors writes 0600)."""
    trained, merged = example_runs["captioner"], example_runs["merge"]
    assert _ok(trained), trained["stderr"][-3000:]
    folder = example_runs["folders"]["captioner"]
    run = folder / "runs" / "florence-lora"
    assert (run / "final" / "adapter_model.safetensors").is_file() and list((run / "checkpoints").iterdir())
    assert _ok(merged), merged["stderr"][-3000:]
    assert list((folder / "merged").glob("*.safetensors"))
    assert _modes_not_plain(run) == [] and _modes_not_plain(folder / "merged") == []


@pytest.mark.slow
def test_the_example_tagger_config_trains_with_a_local_backbone(example_runs):
    """examples/tagger.yaml with only what needs the hub or hours changed (backbone, image size, epochs).
    Its output tree (best/ final/ last/ checkpoints/) is readable like any file the user writes."""
    trained = example_runs["tagger"]
    assert _ok(trained), trained["stderr"][-3000:]
    run = example_runs["folders"]["tagger"] / "runs" / "tagger"
    assert {"best", "final", "last", "checkpoints"} <= {path.name for path in run.iterdir()}
    assert (run / "best" / "model.safetensors").is_file() and (run / "best" / "model.onnx").is_file()
    assert _modes_not_plain(run) == []
    json.loads((run / "best" / "config.json").read_text())
