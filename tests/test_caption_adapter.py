"""``--adapter``: a LoRA adapter on top of the base model gives the merged model's captions."""

from __future__ import annotations

import pytest
import torch

import captionkit
from captionkit.core.store import Store
from tests.images import write_good_images


def _make_adapter(base, folder):
    from peft import LoraConfig, get_peft_model
    from transformers import Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|fc1|fc2)")
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a trained adapter is not a no-op
    peft_model.save_pretrained(folder / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(folder / "merged")
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(base).save_pretrained(folder / "merged")
    return folder / "adapter", folder / "merged"


def test_adapter_captions_equal_the_merged_model(tmp_path, tiny_florence):
    adapter, merged = _make_adapter(tiny_florence, tmp_path)
    write_good_images(tmp_path / "images", 5)
    options = {"max_new_tokens": 12, "num_beams": 1, "progress": "quiet", "write_sidecars": False}
    captionkit.caption(tmp_path / "images", model=str(tiny_florence), adapter=adapter,
                       output_dir=tmp_path / "with-adapter", **options)
    captionkit.caption(tmp_path / "images", model=str(merged), output_dir=tmp_path / "merged", **options)
    captionkit.caption(tmp_path / "images", model=str(tiny_florence), output_dir=tmp_path / "base", **options)

    def texts(location):
        with Store(location) as store:
            return {r.record_id: r.raw["text"] for r in store.iter_results("caption")}

    assert texts(tmp_path / "with-adapter") == texts(tmp_path / "merged")
    assert texts(tmp_path / "with-adapter") != texts(tmp_path / "base")


def test_adapter_is_part_of_the_fingerprint_and_checked(tmp_path, tiny_florence):
    adapter, _ = _make_adapter(tiny_florence, tmp_path)
    plain = captionkit.build_captioner(str(tiny_florence))
    adapted = captionkit.build_captioner(str(tiny_florence), adapter=adapter)
    assert plain.fingerprint()["adapter"] is None
    from_adapter = captionkit.build_captioner(adapter=adapter)  # the base recorded in the adapter
    for key in ("model", "revision"):  # a local folder is its content, wherever it is
        assert from_adapter.fingerprint()[key] == plain.fingerprint()[key]
    assert adapted.fingerprint()["adapter"]["revision"].startswith("content:")
    broken = captionkit.build_captioner(str(tiny_florence), adapter=tmp_path)
    with pytest.raises(captionkit.CaptionkitError, match="adapter_config.json"):
        broken.load()
