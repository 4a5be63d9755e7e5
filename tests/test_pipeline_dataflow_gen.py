"""Dataflow-Gen files run as written, pointed at tiny local models.

The example configuration of Dataflow-Gen's documentation (tests/fixtures/) runs from a folder laid
out like its repository root, as Dataflow-Gen runs it; a long file with its own step names and keys
runs unchanged: prompts → FLUX images → two VLM captioners (one with repeat_time samples) → GPT
rewrite → SD3 images. What such files get wrong (indentation, API model names, class names,
typos) is caught before anything runs, in the file's words.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from captionkit.core.errors import CaptionkitError
from captionkit.pipeline import load_pipeline, run_pipeline
from tests.in_process import run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXAMPLE = FIXTURES / "dataflow_gen_image_caption.yaml"  # docs/image.md's example configuration
ADDED_STEP = FIXTURES / "dataflow_gen_add_text_step.yaml"  # docs/image.md's "Adding New Steps" block
CLI = [sys.executable, "-m", "captionkit.cli"]
ROWS = [  # docs/image.md, 3.1 and 4.1: two images and a video
    {"image": "images/cat.jpg", "text": "A cat sitting on a windowsill."},
    {"image": "images/sunset.png", "text": "A beautiful sunset over the mountains."},
    {"video": "video1.mp4", "text": "A timelapse of city traffic at night."},
]

DATAFLOW_GEN_FILE = """
meta_path: {root}/prompts.jsonl
meta_folder: {root}
base_folder: {root}/intermediate
save_folder: {root}/final
image_key: image
text_key: prompt
steps:
  - type: ImageGenerator
    name: FLUXGenerator
    config:
      model_path: {flux}
      height: 32
      width: 48
      guidance_scale: 3.5
      num_inference_steps: 2
      max_sequence_length: 32
      batch_size: 2
      device: cpu
  - type: ImageCaptioner
    name: LLaVACaptioner
    config:
      model_path: {llava}
      trust_remote_code: false
      tensor_parallel_size: 1
      max_model_len: 4096
      max_num_seqs: 8
      temperature: 0
      top_p: 1.0
      repetition_penalty: 1.05
      prompt: Describe this image in one sentence.
      repeat_time: 1
      batch_size: 2
  - type: ImageCaptioner
    name: QwenVLCaptioner
    config:
      model_path: {qwen}
      temperature: 0.8
      top_p: 0.9
      top_k: 20
      prompt: What is in this picture?
      repeat_time: 2
      batch_size: 3
  - type: TextGenerator
    name: GPTTextGenerator
    config:
      model: {chat}
      max_num_seqs: 4
      temperature: 0
      sys_prompt: You rewrite image captions.
      prompt: "Rewrite this caption: {{llava_captioner}}"
      batch_size: 4
  - type: ImageGenerator
    name: StableDiffusionGenerator
    config:
      model_path: {sd3}
      height: 32
      width: 32
      num_inference_steps: 2
      batch_size: 3
"""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    pytest.importorskip("diffusers")
    from captionkit.testing.diffusion import build_tiny_flux, build_tiny_sd3
    from captionkit.testing.text import build_tiny_chat_lm
    from captionkit.testing.vlms.llava import build_llava
    from captionkit.testing.vlms.qwen_vl import build_qwen2_vl

    root = tmp_path_factory.mktemp("dataflow-gen-models")
    return {"flux": build_tiny_flux(root / "flux"), "sd3": build_tiny_sd3(root / "sd3"),
            "llava": build_llava(root / "llava"), "qwen": build_qwen2_vl(root / "qwen"),
            "chat": build_tiny_chat_lm(root / "chat", context=4096)}  # room for 256-token random captions


@pytest.mark.slow
def test_a_dataflow_gen_file_runs_unchanged_and_resumes(tmp_path, tiny_models, one_torch_thread):
    prompts = ["a red circle on white", "a blue square", "a green triangle at night"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": text, "source": "test"}) + "\n"
                                                    for text in prompts))
    config = tmp_path / "dataflow.yaml"
    config.write_text(DATAFLOW_GEN_FILE.format(root=tmp_path, **tiny_models))
    report = run_pipeline(config)
    assert [step.output_field for step in report.steps] == [
        "flux_generator", "llava_captioner", "qwen_vl_captioner", "gpt_text_generator",
        "stable_diffusion_generator"]
    assert [step.processed for step in report.steps] == [3, 3, 3, 3, 3], [step.errors for step in report.steps]
    rows = [json.loads(line) for line in (tmp_path / "final" / "result.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == prompts and all(row["source"] == "test" for row in rows)
    for row in rows:
        flux_image = Path(row["flux_generator"])
        assert flux_image.is_relative_to(tmp_path / "final" / "generated_images")
        with Image.open(flux_image) as image:
            assert image.size == (48, 32)
        assert row["llava_captioner"] and len(row["qwen_vl_captioner_all"]) == 2  # repeat_time kept as a list
        assert row["gpt_text_generator"] is not None
        with Image.open(row["stable_diffusion_generator"]) as image:
            assert image.size == (32, 32)
    for index, step in enumerate(report.steps):
        folder = tmp_path / "intermediate" / f"step_{index + 1}_{step.type}_{step.output_field}"
        assert (folder / "result.jsonl").is_file()
    again = run_pipeline(config)
    assert [(step.processed, step.done) for step in again.steps] == [(0, 3)] * 5


# --------------------------------------------------------------- the documentation's example, as written
@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    from captionkit.testing.vlms.llava import build_llava

    return build_llava(tmp_path_factory.mktemp("dataflow-gen-llava") / "llava")


def repository_root(tmp_path: Path, llava: Path, config_text: str | None = None) -> Path:
    """A folder laid out like Dataflow-Gen's repository: configs/, data/image/, and the model under models/."""
    root = tmp_path / "Dataflow-Gen"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "ImageCaption.yaml").write_text(config_text or EXAMPLE.read_text())
    images = root / "data" / "image" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (40, 30), "orange").save(images / "cat.jpg")
    Image.new("RGB", (30, 40), "purple").save(images / "sunset.png")
    (root / "data" / "image" / "test_image_captioner.jsonl").write_text("".join(json.dumps(row) + "\n"
                                                                                for row in ROWS))
    (root / "models").mkdir()
    (root / "models" / "llava-1.5-7b-hf").symlink_to(llava, target_is_directory=True)
    return root


def added_step_block() -> list[str]:
    """The documentation's block for a new step, without the fixture's comment lines."""
    return [line for line in ADDED_STEP.read_text().splitlines() if not line.startswith("#")]


def example_with_added_step(fix_indentation: bool = False, drop: tuple[str, ...] = (), **replace: str) -> str:
    """The example configuration with the added step pasted under `steps` (two spaces, like its items)."""
    block = added_step_block()
    if fix_indentation:  # what the user does after reading the hint: one more space under the item
        block = [block[0], *(" " + line for line in block[1:])]
    block = [line for line in block if line.strip().split(":")[0] not in drop]
    for key, value in replace.items():
        block = [f"{line.split(':')[0]}: {value}" if line.strip().startswith(f"{key}:") else line
                 for line in block]
    return EXAMPLE.read_text() + "".join(f"  {line}\n" for line in block)


@pytest.mark.slow
def test_the_documented_example_runs_as_written_from_the_repository_root(tmp_path, tiny_llava):
    root = repository_root(tmp_path, tiny_llava)
    # the console entry point in this process, from the repository root: the command as written, without a
    # fresh interpreter's imports (the run below checks that the hub is never asked in a fresh process)
    planned = run_cli("run", "--config", "configs/ImageCaption.yaml", "--dry-run", cwd=root)
    assert planned.returncode == 0, planned.stderr
    assert f"paths: relative paths start from the current folder {root}" in planned.stderr
    assert "step 1 LLaVACaptioner (captioner -> llava_captioner): 2 records" in planned.stderr
    result = run_cli("run", "--config", "configs/ImageCaption.yaml", "-q", cwd=root)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len([line for line in warnings if "video" in line]) == 1  # one warning for the video rows
    assert len([line for line in warnings if "tensor_parallel_size" in line]) == 1  # announced once
    rows = [json.loads(line) for line in (root / "results" / "image_captioner" / "result.jsonl").read_text()
            .splitlines()]
    assert [row["image"] for row in rows] == ["images/cat.jpg", "images/sunset.png"]
    assert [row["text"] for row in rows] == [ROWS[0]["text"], ROWS[1]["text"]]
    assert all(len(row["llava_captioner_all"]) == 5 for row in rows)  # repeat_time: 5
    assert (root / "image_intermediate_results" / "step_1_captioner_llava_captioner" / "result.jsonl").is_file()
    assert not (root / "configs" / "image_intermediate_results").exists()  # nothing beside the file


def test_relative_paths_start_where_the_files_own_tool_starts_them(tmp_path, tiny_llava, monkeypatch):
    root = repository_root(tmp_path, tiny_llava)
    monkeypatch.chdir(root)
    pipeline = load_pipeline("configs/ImageCaption.yaml")  # Dataflow-Gen: from the current folder
    assert pipeline.input == root / "data" / "image" / "test_image_captioner.jsonl"
    assert pipeline.base_folder == root / "image_intermediate_results"
    assert pipeline.save_folder == root / "results" / "image_captioner"
    assert "current folder" in pipeline.path_rule and "Dataflow-Gen" in pipeline.path_rule
    own = root / "configs" / "own.yaml"  # captionkit's spelling: from the file's folder, wherever it is run
    own.write_text(yaml.safe_dump({"input": "../data/image/test_image_captioner.jsonl", "base_folder": "work",
                                   "steps": [{"type": "template", "name": "t", "config": {"template": "{text}"}}]}))
    monkeypatch.chdir(tmp_path)
    pipeline = load_pipeline(own)
    assert pipeline.input.resolve() == root / "data" / "image" / "test_image_captioner.jsonl"
    assert pipeline.base_folder == root / "configs" / "work" and "file's folder" in pipeline.path_rule
    chosen = root / "configs" / "chosen.yaml"
    chosen.write_text(EXAMPLE.read_text() + "relative_to: file\n")
    with pytest.raises(CaptionkitError, match="configs/data/image/test_image_captioner.jsonl does not exist"):
        load_pipeline(chosen)


def test_video_rows_are_skipped_with_one_warning(tmp_path, tiny_llava, monkeypatch, caplog):
    root = repository_root(tmp_path, tiny_llava)
    manifest = root / "data" / "image" / "test_image_captioner.jsonl"
    rows = [{"video": f"clip{index}.mp4", "text": "a clip"} for index in range(3)] + ROWS[:2]  # videos first
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.chdir(root)
    with caplog.at_level(logging.WARNING, logger="captionkit"):
        report = run_pipeline("configs/ImageCaption.yaml", dry_run=True)
    assert report.steps[0].total == 2 and report.steps[0].todo == 2
    videos = [record.getMessage() for record in caplog.records if "video" in record.getMessage()]
    assert len(videos) == 1 and "3 row(s)" in videos[0]


def test_the_documented_added_step_is_pointed_at_its_indentation_then_its_key_then_its_model(
        tmp_path, tiny_llava, monkeypatch):
    text = example_with_added_step()
    root = repository_root(tmp_path, tiny_llava, text)
    monkeypatch.chdir(root)
    with pytest.raises(CaptionkitError) as caught:
        load_pipeline("configs/ImageCaption.yaml")
    line = text.splitlines().index("   name: GPTTextGenerator") + 1
    assert f"configs/ImageCaption.yaml:{line}:" in str(caught.value)
    assert "   name: GPTTextGenerator" in str(caught.value) and "one space short" in str(caught.value)
    (root / "configs" / "ImageCaption.yaml").write_text(example_with_added_step(fix_indentation=True))
    with pytest.raises(CaptionkitError, match="api_key.*environment variable"):
        load_pipeline("configs/ImageCaption.yaml")
    (root / "configs" / "ImageCaption.yaml").write_text(example_with_added_step(True, drop=("api_key",)))
    with pytest.raises(CaptionkitError) as caught:
        load_pipeline("configs/ImageCaption.yaml")
    message = str(caught.value)
    assert "step 2 (GPTTextGenerator)" in message and "gpt-4o" in message
    assert "backend: openai" in message and "base_url" in message
    planned = subprocess.run([*CLI, "run", "configs/ImageCaption.yaml", "--dry-run"], cwd=root,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "0"})
    assert planned.returncode == 2 and "backend: openai" in planned.stderr  # the hub is never asked


def test_gpt_text_generator_sends_each_records_text_after_the_prompt(tmp_path, tiny_llava, monkeypatch, caplog):
    from captionkit.core.records import Record
    from captionkit.steps.registry import StepContext
    from captionkit.testing.text import build_tiny_chat_lm

    head = EXAMPLE.read_text().split("\nsteps:")[0]
    block = [" " + line if index else line for index, line in enumerate(added_step_block())]
    block = [line for line in block if "api_key" not in line]
    text = head + "\nsteps:\n" + "".join(f"  {line}\n" for line in block).replace("model: gpt-4o", "model: models/chat")
    root = repository_root(tmp_path, tiny_llava, text)
    build_tiny_chat_lm(root / "models" / "chat")
    monkeypatch.chdir(root)
    with caplog.at_level(logging.WARNING, logger="captionkit"):
        pipeline = load_pipeline("configs/ImageCaption.yaml")
    assert any("max_num_seqs" in record.getMessage() and "does nothing with backend transformers" in
               record.getMessage() for record in caplog.records)
    step = pipeline.steps[0]
    assert step.config["input_field"] == "text"  # text_key: the record's text, as Dataflow-Gen sends it
    built = step.step_type.builder(dict(step.config), StepContext(
        index=0, name=step.name, output_field=step.output_field, base_folder=pipeline.base_folder,
        save_folder=pipeline.save_folder, announce=False))
    records = [Record(row["image"], root / "data" / "image" / row["image"], {"text": row["text"]})
               for row in ROWS[:2]]
    prompts = [settings["prompt"] for settings in built.record_settings(records).values()]
    instruction = "Generate a summary for the following content."
    assert prompts == [f"{instruction}\n{ROWS[0]['text']}", f"{instruction}\n{ROWS[1]['text']}"]
    turns = built.prepare(records[1]).payload
    assert turns == [{"role": "system", "content": "You are an excellent assistant."},
                     {"role": "user", "content": prompts[1]}]
    report = run_pipeline(pipeline)
    assert report.steps[0].processed == 2, report.steps[0].errors


def test_a_typo_in_a_dataflow_gen_key_suggests_dataflow_gens_spelling(tmp_path, tiny_llava, monkeypatch):
    root = repository_root(tmp_path, tiny_llava, EXAMPLE.read_text().replace("repeat_time:", "repeat_times:"))
    monkeypatch.chdir(root)
    with pytest.raises(CaptionkitError, match="unknown key 'repeat_times'.*Did you mean 'repeat_time'"):
        load_pipeline("configs/ImageCaption.yaml")


def test_a_dataflow_gen_class_name_is_checked_against_its_type_and_the_model(tmp_path, tiny_llava, monkeypatch,
                                                                              caplog):
    root = repository_root(tmp_path, tiny_llava)
    monkeypatch.chdir(root)
    config = root / "configs" / "ImageCaption.yaml"
    config.write_text(EXAMPLE.read_text().replace("name: LLaVACaptioner", "name: LLaVACaptoner"))
    with pytest.raises(CaptionkitError, match="step 1.*'LLaVACaptoner' is not a Dataflow-Gen ImageCaptioner class. "
                                              "Did you mean 'LLaVACaptioner'"):
        load_pipeline(config)
    config.write_text(EXAMPLE.read_text().replace("name: LLaVACaptioner", "name: FLUXGenerator"))
    with pytest.raises(CaptionkitError, match="'FLUXGenerator' is a ImageGenerator class"):
        load_pipeline(config)
    config.write_text(EXAMPLE.read_text().replace("name: LLaVACaptioner", "name: GPTCaptioner"))
    with pytest.raises(CaptionkitError, match="GPTCaptioner calls an API model; add backend: openai and base_url"):
        load_pipeline(config)  # a local model under an API class
    config.write_text(EXAMPLE.read_text().replace("name: LLaVACaptioner", "name: GPTCaptioner")
                      .replace("model_path: models/llava-1.5-7b-hf", "model: gpt-4o"))
    with pytest.raises(CaptionkitError, match="model 'gpt-4o' is a hosted API's model.*backend: openai"):
        load_pipeline(config)
    config.write_text(EXAMPLE.read_text().replace("type: ImageCaptioner", "type: VideoCaptioner"))
    with pytest.raises(CaptionkitError, match="captionkit reads images"):
        load_pipeline(config)
    config.write_text(EXAMPLE.read_text().replace("name: LLaVACaptioner", "name: QwenVLCaptioner"))
    with caplog.at_level(logging.WARNING, logger="captionkit"):
        load_pipeline(config)
    mismatch = [record.getMessage() for record in caplog.records if "Dataflow-Gen's class" in record.getMessage()]
    assert len(mismatch) == 1 and "qwen2_vl" in mismatch[0] and "a llava model" in mismatch[0]
    assert "LLaVACaptioner" in mismatch[0]  # the class that fits
    caplog.clear()
    config.write_text(EXAMPLE.read_text())
    with caplog.at_level(logging.WARNING, logger="captionkit"):
        load_pipeline(config)
    assert not [record for record in caplog.records if "Dataflow-Gen's class" in record.getMessage()]


def test_device_cuda_without_cuda_names_the_file_and_step_in_the_files_words(tmp_path, tiny_llava, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    text = EXAMPLE.read_text().replace("      batch_size: 1000", "      batch_size: 1000\n      device: cuda")
    root = repository_root(tmp_path, tiny_llava, text)
    monkeypatch.chdir(root)
    with pytest.raises(CaptionkitError) as caught:
        load_pipeline("configs/ImageCaption.yaml")
    message = str(caught.value)
    assert message.startswith("configs/ImageCaption.yaml: step 1 (LLaVACaptioner): device: cuda")
    assert "--device" not in message and "device: cpu" in message


def test_run_takes_the_file_as_config_option_as_dataflow_gen_does(tmp_path):
    (tmp_path / "meta.jsonl").write_text(json.dumps({"id": "a", "prompt": "hello"}) + "\n")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"meta_path": "meta.jsonl", "steps": [
        {"type": "template", "name": "t", "config": {"template": "{prompt}!"}}]}))
    ran = run_cli("run", "--config", "p.yaml", "-q", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert json.loads((tmp_path / "p-output" / "result.jsonl").read_text())["t"] == "hello!"
    both = run_cli("run", "p.yaml", "--config", "other.yaml", cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert both.returncode == 2 and "give one" in both.stderr


# ------------------------------------------------------------------ vLLM: chosen explicitly or announced
def test_the_vllm_choice_is_explicit_or_announced_and_needs_cuda():
    from captionkit.steps.captioner import choose_backend

    keys = ["tensor_parallel_size", "max_num_seqs"]
    backend, keep, note = choose_backend("auto", keys, vllm_installed=True, cuda_available=False)
    assert (backend, keep) == ("auto", False) and "no CUDA GPU" in note
    backend, keep, note = choose_backend("auto", keys, vllm_installed=True, cuda_available=True)
    assert (backend, keep) == ("vllm", True) and "running on vLLM" in note
    backend, keep, note = choose_backend("auto", keys, vllm_installed=False, cuda_available=True)
    assert (backend, keep) == ("auto", False) and "not installed" in note
    backend, keep, note = choose_backend("transformers", keys, vllm_installed=True, cuda_available=True)
    assert (backend, keep) == ("transformers", False) and "do nothing with backend transformers" in note
    assert choose_backend("auto", [], vllm_installed=True, cuda_available=True) == ("auto", False, None)
    backend, keep, note = choose_backend("vllm", keys, vllm_installed=True, cuda_available=False)  # asked for
    assert (backend, keep) == ("vllm", True) and "no CUDA GPU" in note


def test_vllm_installed_without_a_gpu_runs_transformers_and_says_why(tmp_path, tiny_llava, monkeypatch, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fake = tmp_path / "site"  # vLLM cannot be installed here: an importable stand-in, for the choice only
    (fake / "vllm").mkdir(parents=True)
    (fake / "vllm" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(fake))
    root = repository_root(tmp_path, tiny_llava)
    monkeypatch.chdir(root)
    with caplog.at_level(logging.WARNING, logger="captionkit"):
        pipeline = load_pipeline("configs/ImageCaption.yaml")
    notes = [record.getMessage() for record in caplog.records if "vLLM" in record.getMessage()]
    assert len(notes) == 1 and "no CUDA GPU" in notes[0]
    from captionkit.steps.registry import StepContext

    step = pipeline.steps[0]
    built = step.step_type.builder(dict(step.config), StepContext(
        index=0, name=step.name, output_field=step.output_field, base_folder=pipeline.base_folder,
        save_folder=pipeline.save_folder, announce=False))
    from captionkit.models.chat_vlm import ChatVLMCaptioner

    assert isinstance(built.captioner, ChatVLMCaptioner)  # transformers, not the vLLM engine
    # Asked for by name, vLLM is used; with no GPU the failure says so (not "out of GPU memory?").
    (fake / "vllm" / "__init__.py").write_text(
        "__version__ = '0.0'\n"
        "class LLM:\n"
        "    def __init__(self, **options):\n"
        "        raise RuntimeError('Failed to infer device type')\n")
    explicit = root / "configs" / "vllm.yaml"
    explicit.write_text(EXAMPLE.read_text().replace("    config: \n", "    config: \n      backend: vllm\n"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="captionkit"), pytest.raises(CaptionkitError) as caught:
        run_pipeline(explicit)
    assert any("backend: vllm, but torch sees no CUDA GPU" in record.getMessage() for record in caplog.records)
    message = str(caught.value)
    assert message.startswith(f"{explicit}: step 1 (LLaVACaptioner): ")  # the file and the step
    assert "torch sees no CUDA GPU" in message and "Out of GPU memory" not in message
