"""The example configs in examples/ stay valid as the config classes change."""

from pathlib import Path

from captionkit.train.captioner import load_captioner_config
from captionkit.train.tagger import load_tagger_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_captioner_example_loads_and_overrides_apply():
    config = load_captioner_config(EXAMPLES / "captioner.yaml", ["optimizer.lr=5e-5"])
    assert config.mode == "lora" and config.lora.rank == 16 and config.optimizer.lr == 5e-5
    assert config.data[0].task == "<MORE_DETAILED_CAPTION>"


def test_tagger_example_loads_and_overrides_apply():
    config = load_tagger_config(EXAMPLES / "tagger.yaml", ["optimizer.lr=1e-4"])
    assert config.model.backbone == "convnext_tiny" and config.loss.name == "asl" and config.optimizer.lr == 1e-4
    assert config.data.min_count == 50
