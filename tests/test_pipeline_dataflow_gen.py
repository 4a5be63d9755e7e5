"""A Dataflow-Gen file, with its own step names and keys, pointed at tiny local models, runs unchanged:
prompts → FLUX images → two VLM captioners (one with repeat_time samples) → GPT rewrite → SD3 images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from captionkit.pipeline import run_pipeline

pytestmark = pytest.mark.slow  # left out of the quick subset (-m 'not slow')

pytest.importorskip("diffusers")

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
    from captionkit.testing_diffusion import build_tiny_flux, build_tiny_sd3
    from captionkit.testing_text import build_tiny_chat_lm
    from captionkit.testing_vlms.llava import build_llava
    from captionkit.testing_vlms.qwen_vl import build_qwen2_vl

    root = tmp_path_factory.mktemp("dataflow-gen-models")
    return {"flux": build_tiny_flux(root / "flux"), "sd3": build_tiny_sd3(root / "sd3"),
            "llava": build_llava(root / "llava"), "qwen": build_qwen2_vl(root / "qwen"),
            "chat": build_tiny_chat_lm(root / "chat", context=4096)}  # room for 256-token random captions


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
        folder = tmp_path / "intermediate" / f"step_{index}_{step.type}_{step.output_field}"
        assert (folder / "result.jsonl").is_file()
    again = run_pipeline(config)
    assert [(step.processed, step.done) for step in again.steps] == [(0, 3)] * 5
