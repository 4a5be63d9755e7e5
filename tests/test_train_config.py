"""Typed YAML configs: unknown keys, types, overrides, defaults that never clobber the file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from captionkit.train.config import ConfigError, config_to_dict, load_config, parse_override, save_config


@dataclass
class Optim:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Config:
    data: Path
    epochs: int = 3
    freeze_vision: bool = False
    note: Optional[str] = None  # noqa: UP045  (typing.Optional must work too)
    targets: str | list[str] = "default"
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    optimizer: Optim = field(default_factory=Optim)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_file_values_are_read_and_typed(tmp_path):
    text = "data: images\nepochs: 5\noptimizer:\n  lr: 1e-3\n  betas: [0.8, 0.9]\ntags: [a, b]\n"
    path = write(tmp_path, text)
    config = load_config(Config, path, [])
    assert config.data == Path("images")
    assert config.epochs == 5
    assert config.optimizer.lr == pytest.approx(1e-3)  # YAML 1.1 reads "1e-3" as a string
    assert config.optimizer.betas == (0.8, 0.9)
    assert config.optimizer.name == "adamw"
    assert config.tags == ["a", "b"]


def test_defaults_never_clobber_file_values(tmp_path):
    path = write(tmp_path, "data: x\nfreeze_vision: true\noptimizer: {name: adamw8bit}\n")
    config = load_config(Config, path, ["epochs=7"])
    assert config.freeze_vision is True
    assert config.optimizer.name == "adamw8bit"
    assert config.optimizer.lr == pytest.approx(1e-4)
    assert config.epochs == 7


def test_overrides_win_over_file_and_parse_as_yaml(tmp_path):
    path = write(tmp_path, "data: x\nepochs: 2\n")
    config = load_config(
        Config, path, ["epochs=4", "optimizer.lr=0.5", "targets=[q_proj, v_proj]", "weights.a=2", "note=hi"]
    )
    assert config.epochs == 4
    assert config.optimizer.lr == 0.5
    assert config.targets == ["q_proj", "v_proj"]
    assert config.weights == {"a": 2.0}
    assert config.note == "hi"


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "data: x\noptimizer:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(Config, path, [])
    message = str(error.value)
    assert "optimizer.lrr" in message and str(path) in message and "optimizer.lr" in message


def test_unknown_override_key_names_the_override(tmp_path):
    path = write(tmp_path, "data: x\n")
    with pytest.raises(ConfigError, match=r"--set 'epoch=3'.*Did you mean 'epochs'"):
        load_config(Config, path, ["epoch=3"])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("data: x\nepochs: many\n", "'epochs' must be an integer"),
        ("data: x\nfreeze_vision: 1\n", "'freeze_vision' must be true or false"),
        ("data: x\noptimizer: {name: adam}\n", "did you mean 'adamw'"),
        ("data: x\noptimizer: {betas: [1, 2, 3]}\n", "expected 2 items"),
        ("data: x\ntags: a\n", "'tags' must be a list of a string"),
        ("data: x\noptimizer: 3\n", "must be a mapping"),
        ("epochs: 1\n", "required key 'data' is missing"),
        ("data: x\nepochs: 0\n", "epochs must be at least 1"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("data: [\n", "not valid YAML"),
    ],
)
def test_invalid_values_give_clear_errors(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=None) as error:
        load_config(Config, path, [])
    assert needle in str(error.value)
    assert str(path) in str(error.value)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Config, tmp_path / "nope.yaml", [])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(Config, None, ["data"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(Config, None, ["data=x", "epochs=2", "epochs.x=1"])


def test_no_file_uses_overrides_only():
    config = load_config(Config, None, ["data=/tmp/images"])
    assert config.data == Path("/tmp/images")


def test_parse_override_splits_dotted_keys():
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])
    assert parse_override("flag=false") == (["flag"], False)
    assert parse_override("name=") == (["name"], "")


def test_save_config_round_trips(tmp_path):
    config = load_config(Config, None, ["data=imgs", "optimizer.lr=0.01", "weights.x=1.5", "tags=[t]"])
    out = tmp_path / "sub" / "effective.yaml"
    save_config(config, out)
    assert load_config(Config, out, []) == config
    assert config_to_dict(config)["data"] == "imgs"
    assert not list(out.parent.glob("*.tmp"))


def test_an_override_switches_the_example_captioner_config_out_of_lora(caplog):
    """`--set mode=full` on examples/captioner.yaml (which has a lora section) and `--set lora=null` both work."""
    import logging

    from captionkit.train.captioner import CaptionerTrainConfig
    from captionkit.train.lora import LoraSettings

    example = Path(__file__).resolve().parents[1] / "examples" / "captioner.yaml"
    with caplog.at_level(logging.WARNING, logger="captionkit"):
        config = load_config(CaptionerTrainConfig, example, ["mode=full"])
    assert config.mode == "full" and config.lora == LoraSettings()
    notes = [record.getMessage() for record in caplog.records]
    assert any("--set 'mode=full'" in note and "'lora' section" in note and "left out" in note for note in notes)
    assert load_config(CaptionerTrainConfig, example, ["lora=null", "mode=full"]).mode == "full"
    dropped = load_config(CaptionerTrainConfig, example, ["lora=null"])  # the section's defaults, still LoRA
    assert dropped.mode == "lora" and dropped.lora == LoraSettings()
    with pytest.raises(ConfigError, match="lora section is only used with mode"):  # both written: a contradiction
        load_config(CaptionerTrainConfig, example, ["mode=full", "lora.rank=4"])
