"""Learning: a tiny Florence-2 trained on generated shapes really learns to caption them.

The starting models are built from configs with weights drawn at std 0.2: with the stock
initialisation (std 0.02) the tiny decoder's cross-attention carries about 1% of the
residual stream and needs thousands of steps before captions depend on the image,
which no CPU test can afford; a real Florence-2 checkpoint starts far past that point.

The data sets are made easy enough for a ~0.4M-parameter model to learn in a few hundred
CPU steps: fixed-size shapes centred in their slots (a few pixels of jitter), 128 px
images (4x4 visual tokens, two token columns per object) for the two-object captions.
Held-out images come from another seed. Measured on 1 core: full fine-tune reaches exact
match 1.0 after 500 steps (a 300-step run reached only 0.85, so it keeps 500), LoRA 0.98 on
one-object captions after 250 steps (0.97 after 200, 1.0 after 400; 1000 images learn as well
as 2000); measured again: 1.0 after 250, 0.88 after 150, so it runs 200.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from captionkit.train.captioner import CaptionerTrainConfig, OptimizerSettings, SchedulerSettings, train_captioner
from captionkit.train.captioner_data import DatasetSpec, write_shapes_dataset
from captionkit.train.lora import LoraSettings

torch = pytest.importorskip("torch")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_split(root: Path, count: int, image_size: int, **layout) -> tuple[Path, Path, Path]:
    from captionkit.testing import build_tiny_florence2

    write_shapes_dataset(root / "train", count, seed=1, size=image_size, **layout)
    write_shapes_dataset(root / "held_out", 60, seed=2, size=image_size, **layout)
    model = build_tiny_florence2(root / "model", image_size=image_size, init_std=0.2)
    return model, root / "train", root / "held_out"


@pytest.fixture(scope="module")
def two_shapes(tmp_path_factory) -> tuple[Path, Path, Path]:
    """'a red circle and a blue square': 4 colours x 3 shapes per slot, 128 px."""
    return make_split(tmp_path_factory.mktemp("two-shapes"), 2000, 128, objects=2, extent=56, jitter=3)


@pytest.fixture(scope="module")
def one_shape(tmp_path_factory) -> tuple[Path, Path, Path]:
    """'a red circle': one centred shape, 64 px."""
    return make_split(tmp_path_factory.mktemp("one-shape"), 1000, 64, objects=1, extent=48, jitter=4)


def run(split, output: Path, max_steps: int, **settings):
    model, train, held_out = split
    config = CaptionerTrainConfig(
        model=str(model), output_dir=output, data=[DatasetSpec(path=train)], val_data=[DatasetSpec(path=held_out)],
        batch_size=16, max_target_tokens=24, report_to=[], log_every_steps=50, seed=0, max_steps=max_steps,
        eval_every_steps=max_steps, sample_captions=60, **settings,
    )
    return train_captioner(config)


def wrong(result) -> list[tuple[str, str]]:
    return [(generated, reference) for generated, reference in result.sample_captions if generated != reference]


@pytest.mark.slow
def test_full_finetune_reaches_90_percent_exact_match(two_shapes, tmp_path):
    result = run(two_shapes, tmp_path / "full", 500,
                 optimizer=OptimizerSettings(lr=1.5e-3), scheduler=SchedulerSettings(name="cosine", warmup_steps=50))
    print(f"full fine-tune held-out exact match: {result.metrics['exact_match']:.3f}; wrong: {wrong(result)}")
    assert result.metrics["exact_match"] >= 0.9


@pytest.mark.slow
def test_lora_clearly_learns(one_shape, tmp_path):
    result = run(one_shape, tmp_path / "lora", 200, mode="lora",
                 lora=LoraSettings(rank=16, alpha=32, dropout=0.0, target_modules="all_linear"),
                 optimizer=OptimizerSettings(lr=5e-3), scheduler=SchedulerSettings(name="cosine", warmup_steps=30))
    print(f"LoRA held-out exact match: {result.metrics['exact_match']:.3f}; wrong: {wrong(result)}")
    # The frozen random lm_head (tied to the embedding) and layer norms cap how peaked the
    # logits get: val_loss stays near 2 at every caption position (about p = 0.13 for the
    # right token) while every greedy caption is right, so exact match is the measure.
    assert result.metrics["exact_match"] >= 0.7
