"""Learning: a tiny Florence-2 trained on generated shapes really learns to caption them.

The starting models are built from configs with weights drawn at std 0.2: with the stock
initialisation (std 0.02) the tiny decoder's cross-attention carries about 1% of the
residual stream and needs thousands of steps before captions depend on the image,
which no CPU test can afford; a real Florence-2 checkpoint starts far past that point.

The data set is made easy enough for a ~0.4M-parameter model to learn in a few hundred
CPU steps: one fixed-size shape centred in a 64 px image (a few pixels of jitter; 4 colours
x 3 shapes, so a caption that ignores the image is right about 1 time in 12). Both tests
train on it (one data set and model built per module). Held-out images come from another seed.

Measured before (1 core): full fine-tune on two-object 128 px captions reached exact match
1.0 after 500 steps (0.85 after 300), ~80 s of CPU; LoRA on this set 0.98 after 250 steps
(0.97 after 200, 1.0 after 400; 1000 images learn as well as 2000), 1.0 after 250, 0.88 after
150, so it runs 200. Measured for the cheaper full fine-tune (training seeds 0, 1, 2; ~0.07 s
of CPU a step): two objects at 64 px (one token column each) learn far slower than at 128 px
(0.65-0.75 after 400 steps); one object reaches 0.72-0.75 after 100 steps, 0.93-0.97 after 200
and 0.83-0.98 after 250 at lr 3e-3 (every miss a blue shape: blue on grey has the least
contrast; with blue left out one seed of three still stayed at 0.63 after 200); after 300
steps 0.98, 1.0, 1.0 at lr 3e-3 (1.0, 1.0, 0.98 at 2e-3), ~22 s of CPU, so it runs 300.
LoRA after 150 steps: 0.88, 0.68, 0.33, so it keeps 200. Broken training fails the full
fine-tune's 0.9: lr 1e-7 (lr 0 is refused by the config) gives 0.0, a loss computed on blank
images instead of the batch's gives 0.0 (every caption empty).
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
def one_shape(tmp_path_factory) -> tuple[Path, Path, Path]:
    """'a red circle': one centred shape (4 colours x 3 shapes), 64 px; both tests train on it."""
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
def test_full_finetune_reaches_90_percent_exact_match(one_shape, tmp_path):
    result = run(one_shape, tmp_path / "full", 300,
                 optimizer=OptimizerSettings(lr=3e-3), scheduler=SchedulerSettings(name="cosine", warmup_steps=30))
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
