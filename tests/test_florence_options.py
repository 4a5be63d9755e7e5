"""Florence-2 backend options: dtype, attention, device, model ids."""

from __future__ import annotations

import pytest
import torch

import captionkit
from captionkit.core.errors import CaptionkitError
from captionkit.core.store import Store
from captionkit.models.florence2 import native_model_id, resolve_device, resolve_dtype
from tests.images import write_good_images


def test_auto_dtype_is_fp32_on_cpu_and_names_are_checked():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(CaptionkitError, match="use auto, fp32"):
        resolve_dtype("int3", "cpu")


def test_devices_are_checked_with_a_clear_message():
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(CaptionkitError, match="torch sees none"):
            resolve_device("cuda:0")
    with pytest.raises(CaptionkitError, match="use auto, cpu"):
        resolve_device("tpu")


def test_microsoft_ids_map_to_native_checkpoints():
    assert native_model_id("microsoft/Florence-2-large") == "florence-community/Florence-2-large"
    with pytest.raises(CaptionkitError, match="florence-community"):
        native_model_id("microsoft/Florence-2-huge")


def test_eager_attention_matches_sdpa_and_bf16_runs(tmp_path, tiny_florence):
    write_good_images(tmp_path / "images", 4)
    options = {"max_new_tokens": 10, "num_beams": 1, "progress": "quiet", "write_sidecars": False}
    results = {}
    for name, extra in {"sdpa": {}, "eager": {"attn_implementation": "eager"}, "bf16": {"dtype": "bf16"}}.items():
        captionkit.caption(tmp_path / "images", model=str(tiny_florence), output_dir=tmp_path / name,
                           **options, **extra)
        with Store(tmp_path / name) as store:
            results[name] = {r.record_id: r for r in store.iter_results("caption")}
    assert {k: r.raw["text"] for k, r in results["eager"].items()} == {
        k: r.raw["text"] for k, r in results["sdpa"].items()}
    assert all(r.status == "ok" for r in results["bf16"].values())


def test_flash_attention_needs_its_package_or_a_gpu(tmp_path, tiny_florence):
    captioner = captionkit.build_captioner(str(tiny_florence), attn_implementation="flash_attention_2")
    with pytest.raises(CaptionkitError, match="flash"):
        captioner.load()
    with pytest.raises(CaptionkitError, match="sdpa, eager or flash_attention_2"):
        captionkit.build_captioner(str(tiny_florence), attn_implementation="fast")
