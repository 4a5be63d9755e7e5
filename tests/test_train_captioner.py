"""Captioner training: loss masking, freezing, checkpoints, resume, exports, merge, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from captionkit.train.captioner import (
    CaptionerTrainConfig,
    OptimizerSettings,
    SchedulerSettings,
    enable_vision_checkpointing,
    freeze_groups,
    load_captioner_config,
    lr_multiplier,
    token_losses,
    train_captioner,
)
from captionkit.train.captioner_data import AugmentConfig, CaptionCollator, DatasetSpec
from captionkit.train.config import ConfigError
from captionkit.train.lora import LoraSettings, matching_modules


def make_config(base_model: Path, shapes: Path, output: Path, **overrides) -> CaptionerTrainConfig:
    settings = dict(model=str(base_model), output_dir=output, data=[DatasetSpec(path=shapes)], batch_size=4,
                    max_target_tokens=32, report_to=[], log_every_steps=1)
    settings.update(overrides)
    return CaptionerTrainConfig(**settings)


def load_model(folder):
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    return Florence2ForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def test_padding_does_not_change_a_samples_loss(base_model):
    model, processor = load_model(base_model)
    picture = Image.new("RGB", (64, 64), "blue")
    short = {"image": picture, "task": "<CAPTION>", "caption": "a red circle", "index": 0}
    long = {"image": picture, "task": "<MORE_DETAILED_CAPTION>", "index": 1,
            "caption": "a red circle and a blue square and a green triangle and a yellow star"}
    collator = CaptionCollator(processor, 64)
    alone, together = collator([short]), collator([short, long])
    assert together["labels"].shape[1] > alone["labels"].shape[1]  # the short caption is padded
    assert together["input_ids"].shape[1] > alone["input_ids"].shape[1]  # and so is its prompt
    with torch.no_grad():
        loss_alone = token_losses(model, alone)[0].sum() / (alone["labels"][0] != -100).sum()
        per_token = token_losses(model, together)
    padded = together["labels"][0] == -100
    assert padded.any() and (per_token[0][padded] == 0).all()
    loss_padded = per_token[0].sum() / (~padded).sum()
    torch.testing.assert_close(loss_padded, loss_alone, rtol=1e-5, atol=1e-5)


def test_freeze_groups_map_onto_the_native_module_tree(base_model, shapes, tmp_path):
    model, _ = load_model(base_model)
    groups = freeze_groups(model)
    assert {id(p) for p in groups["vision"]} == {id(p) for p in model.model.vision_tower.parameters()}
    assert {id(p) for p in groups["other"]} == {id(p) for p in model.model.multi_modal_projector.parameters()}
    assert id(model.lm_head.weight) in {id(p) for p in groups["language"]}
    assert sum(len(group) for group in groups.values()) == len(list(model.parameters()))
    config = make_config(base_model, shapes, tmp_path / "out", freeze_vision=True, freeze_other=True, max_steps=2,
                         optimizer=OptimizerSettings(lr=1e-2))
    before, _ = load_model(base_model)
    train_captioner(config)
    after, _ = load_model(tmp_path / "out" / "final")
    for (name, old), new in zip(before.named_parameters(), after.parameters(), strict=True):
        changed = not torch.equal(old, new)
        if name.startswith(("model.vision_tower", "model.multi_modal_projector")):
            assert not changed, name
    assert any(not torch.equal(old, new) for (name, old), new in
               zip(before.named_parameters(), after.parameters(), strict=True)
               if name.startswith("model.language_model"))


def test_vision_checkpointing_keeps_loss_and_gradients(base_model, shapes):
    model, processor = load_model(base_model)
    model.train()
    images = [Image.open(path).convert("RGB") for path in sorted(shapes.glob("*.png"))[:2]]
    samples = [{"image": image, "task": "<CAPTION>", "caption": "a red circle", "index": i}
               for i, image in enumerate(images)]
    batch = CaptionCollator(processor, 32)(samples)
    plain = token_losses(model, batch).sum()
    plain.backward()
    reference = [p.grad.clone() for p in model.model.vision_tower.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert enable_vision_checkpointing(model) == 4
    checkpointed = token_losses(model, batch).sum()
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, plain)
    for expected, parameter in zip(reference, model.model.vision_tower.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-4, atol=1e-6)


def test_schedules_warm_up_then_decay():
    cosine = lr_multiplier(SchedulerSettings(name="cosine", warmup_steps=2, min_lr_ratio=0.1), 12)
    assert cosine(0) < cosine(1) < cosine(2) == pytest.approx(1.0)
    assert cosine(12) == pytest.approx(0.1)
    constant = lr_multiplier(SchedulerSettings(name="constant"), 10)
    assert constant(0) == constant(9) == 1.0
    restarts = lr_multiplier(SchedulerSettings(name="cosine_with_restarts", num_cycles=2), 10)
    assert restarts(5) == pytest.approx(1.0) and restarts(4) < 0.2
    onecycle = lr_multiplier(SchedulerSettings(name="onecycle"), 10)
    assert onecycle(0) == pytest.approx(1 / 25) and onecycle(3) == pytest.approx(1.0) and onecycle(10) < 1e-6


def test_config_errors_are_clear(base_model, shapes, tmp_path):
    with pytest.raises(ValueError, match="apply to mode 'full'"):
        make_config(base_model, shapes, tmp_path, mode="lora", freeze_vision=True)
    with pytest.raises(ValueError, match="only used with mode 'lora'"):
        make_config(base_model, shapes, tmp_path, lora=LoraSettings(rank=4))
    with pytest.raises(ValueError, match="not both"):
        make_config(base_model, shapes, tmp_path, epochs=1, max_steps=3)
    with pytest.raises(ValueError, match="needs validation data"):
        make_config(base_model, shapes, tmp_path, eval_every_steps=3)
    with pytest.raises(ValueError, match="neither a preset"):
        LoraSettings(target_modules="(")
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"model": str(base_model), "output_dir": str(tmp_path / "o"),
                                    "data": [{"path": str(shapes), "caption_extention": ".txt"}]}))
    with pytest.raises(ConfigError, match=r"unknown key 'data\[0\].caption_extention'.*caption_extension"):
        load_captioner_config(file)
    with pytest.raises(ConfigError, match="fp16' needs a CUDA GPU"):
        train_captioner(make_config(base_model, shapes, tmp_path / "x", mixed_precision="fp16", cpu=True))
    with pytest.raises(ConfigError, match="qlora.*needs a CUDA GPU"):
        train_captioner(make_config(base_model, shapes, tmp_path / "x", mode="qlora", cpu=True))
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        train_captioner(make_config(base_model, shapes, tmp_path / "x", optimizer=OptimizerSettings(name="adamw8bit"),
                                    max_steps=1))
    with pytest.raises(ConfigError, match="pip install wandb"):
        train_captioner(make_config(base_model, shapes, tmp_path / "x", report_to=["wandb"], max_steps=1))


def test_lora_default_targets_only_the_language_model(base_model):
    model, _ = load_model(base_model)
    names = matching_modules(model, "language")
    assert names and all(name.startswith("model.language_model.") for name in names)
    assert any(name.endswith("encoder_attn.q_proj") for name in names) and any(name.endswith("fc2") for name in names)
    everything = matching_modules(model, "all_linear")
    assert any(name.startswith("model.vision_tower.") for name in everything)
    by_name = matching_modules(model, ["q_proj"])
    assert by_name and all(name.endswith("q_proj") for name in by_name)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resumed_run_matches_an_uninterrupted_one(base_model, shapes, tmp_path, mode):
    from safetensors.torch import load_file

    extra = dict(mode=mode, gradient_accumulation_steps=2, max_steps=5, save_every_steps=2, val_split=0.25,
                 eval_every_steps=2, seed=3, scheduler=SchedulerSettings(name="cosine", warmup_steps=1),
                 augment=AugmentConfig(shuffle_parts=True, separator=" and "))
    if mode == "lora":
        extra["lora"] = LoraSettings(rank=4, dropout=0.2)
    # 18 training images, batch 4 -> 5 batches per epoch, 3 steps per epoch: step 2 is mid-epoch.
    whole = train_captioner(make_config(base_model, shapes, tmp_path / "whole", **extra))
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-0000002"
    state = json.loads((checkpoint / "training_state" / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (2, 0, 4)
    assert (checkpoint / "train_config.yaml").exists()
    resumed = train_captioner(make_config(base_model, shapes, tmp_path / "resumed", **extra),
                              resume_from=checkpoint)
    assert resumed.global_step == whole.global_step == 5
    name = "model.safetensors" if mode == "full" else "adapter_model.safetensors"
    expected = load_file(whole.final_path / name)
    actual = load_file(resumed.final_path / name)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    assert resumed.metrics["val_loss"] == pytest.approx(whole.metrics["val_loss"], rel=1e-5)


def test_full_finetune_export_loads_with_plain_transformers(base_model, shapes, tmp_path):
    result = train_captioner(make_config(base_model, shapes, tmp_path / "out", max_steps=2,
                                         save_every_steps=1, save_total_limit=1, val_split=0.25,
                                         best_metric="val_loss"))
    model, processor = load_model(result.final_path)
    picture = Image.open(next(shapes.glob("*.png"))).convert("RGB")
    inputs = processor(text="<CAPTION>", images=picture, return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=5).shape[0] == 1
    saved = yaml.safe_load((result.final_path / "train_config.yaml").read_text())
    assert saved["max_steps"] == 2
    kept = sorted(path.name for path in (tmp_path / "out" / "checkpoints").iterdir() if path.is_dir())
    assert result.best_checkpoint is not None and result.best_checkpoint.name in kept and len(kept) <= 2
    assert "step-0000002" in kept
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in row for row in logged) and any("val/cider" in row for row in logged)


def test_lora_adapter_loads_with_peft_and_merges_to_same_outputs(base_model, shapes, tmp_path):
    from peft import PeftModel

    from captionkit.train.captioner_cli import merge_lora_command

    config = make_config(base_model, shapes, tmp_path / "out", mode="lora", max_steps=3,
                         optimizer=OptimizerSettings(lr=5e-2),
                         lora=LoraSettings(rank=4, dropout=0.0))
    result = train_captioner(config)
    assert (result.final_path / "adapter_config.json").exists()
    assert (result.final_path / "tokenizer_config.json").exists()
    base, processor = load_model(base_model)
    adapted = PeftModel.from_pretrained(base, result.final_path).eval()
    picture = Image.open(next(shapes.glob("*.png"))).convert("RGB")
    inputs = processor(text="<CAPTION>", images=picture, return_tensors="pt")
    with torch.no_grad():
        adapter_logits = adapted(**inputs, decoder_input_ids=torch.tensor([[2, 0]])).logits
        plain, _ = load_model(base_model)
        base_logits = plain(**inputs, decoder_input_ids=torch.tensor([[2, 0]])).logits
    assert not torch.allclose(adapter_logits, base_logits)  # the adapter changed something
    merge_lora_command(adapter=result.final_path, output=tmp_path / "merged", base=None)
    merged, merged_processor = load_model(tmp_path / "merged")
    with torch.no_grad():
        merged_logits = merged(**inputs, decoder_input_ids=torch.tensor([[2, 0]])).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-5)
    assert adapted.generate(**inputs, max_new_tokens=6).tolist() == merged.generate(**inputs, max_new_tokens=6).tolist()


def test_cli_runs_with_overrides_and_resume_latest(base_model, shapes, tmp_path):
    from typer.testing import CliRunner

    from captionkit.train.cli import train_app

    file = tmp_path / "captioner.yaml"
    file.write_text(yaml.safe_dump({
        "model": str(base_model), "output_dir": str(tmp_path / "out"), "data": [{"path": str(shapes)}],
        "batch_size": 4, "max_steps": 1, "max_target_tokens": 32, "report_to": [], "save_every_steps": 1}))
    runner = CliRunner()
    result = runner.invoke(train_app, ["captioner", "--config", str(file), "--set", "max_steps=2"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    effective = yaml.safe_load((tmp_path / "out" / "train_config.yaml").read_text())
    assert effective["max_steps"] == 2 and effective["batch_size"] == 4
    result = runner.invoke(train_app, ["captioner", "-c", str(file), "--set", "max_steps=3", "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert "trained 3 steps" in result.output
    result = runner.invoke(train_app, ["captioner", "-c", str(file), "--set", "batch_sise=2"])
    assert result.exit_code == 2 and "batch_size" in result.output


def test_save_every_epochs_counts_epochs_from_one(base_model, shapes, tmp_path):
    config = make_config(base_model, shapes, tmp_path / "run", batch_size=12, epochs=4, save_every_epochs=2)
    train_captioner(config)  # 24 images, batch 12: 2 steps per epoch
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir())
    assert saved == ["step-0000004", "step-0000008"]
