"""Learning: a tiny Florence-2 trained on generated shapes really learns to caption them.

The starting model is built from configs with weights drawn at std 0.2: with the stock
initialisation (std 0.02) the tiny decoder's cross-attention carries about 1% of the
residual stream and needs thousands of steps before captions depend on the image,
which no CPU test can afford; a real Florence-2 checkpoint starts far past that point.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from captionkit.train.captioner import CaptionerTrainConfig, OptimizerSettings, SchedulerSettings, train_captioner
from captionkit.train.captioner_data import DatasetSpec, write_shapes_dataset
from captionkit.train.lora import LoraSettings

_NOT_YET = pytest.mark.xfail(
    strict=False,
    reason="hyper-parameters not yet tuned: the tiny model overfits 600 images (EM 0.10 held out) or stays on "
    "the language prior (EM 0.02 with 3000 images, lr 2e-3); see the helper's report",
)


@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory) -> tuple[Path, Path, Path]:
    from captionkit.testing import build_tiny_florence2

    root = tmp_path_factory.mktemp("learning")
    write_shapes_dataset(root / "train", 3000, seed=1)
    write_shapes_dataset(root / "held_out", 60, seed=2)
    model = build_tiny_florence2(root / "model", init_std=0.2)
    return model, root / "train", root / "held_out"


def run(shapes_split, output: Path, **settings):
    model, train, held_out = shapes_split
    config = CaptionerTrainConfig(
        model=str(model), output_dir=output, data=[DatasetSpec(path=train)], val_data=[DatasetSpec(path=held_out)],
        batch_size=16, max_target_tokens=24, report_to=[], log_every_steps=50, seed=0, **settings,
    )
    return train_captioner(config)


@pytest.mark.slow
@_NOT_YET
def test_full_finetune_reaches_90_percent_exact_match(shapes_split, tmp_path):
    result = run(shapes_split, tmp_path / "full", max_steps=700,
                 optimizer=OptimizerSettings(lr=2e-3), scheduler=SchedulerSettings(name="cosine", warmup_steps=30))
    print(f"full fine-tune exact match: {result.metrics['exact_match']:.3f}", result.sample_captions[:3])
    assert result.metrics["exact_match"] >= 0.9


@pytest.mark.slow
@_NOT_YET
def test_lora_clearly_learns(shapes_split, tmp_path):
    result = run(shapes_split, tmp_path / "lora", mode="lora", max_steps=400,
                 lora=LoraSettings(rank=16, alpha=32, dropout=0.0, target_modules="all_linear"),
                 optimizer=OptimizerSettings(lr=5e-3), scheduler=SchedulerSettings(name="cosine", warmup_steps=20))
    print(f"LoRA exact match: {result.metrics['exact_match']:.3f}", result.sample_captions[:3])
    assert result.metrics["val_loss"] < 1.0
    assert result.metrics["exact_match"] >= 0.3
