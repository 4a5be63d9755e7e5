"""Tagger loading: WD ONNX, WD timm v3 and our own folders, checked against plain references.

The WD fixtures are built here the way the published repos are laid out: a WD ONNX
folder (NHWC BGR 0-255 input, sigmoid output, selected_tags.csv) and a WD timm folder
(config.json with architecture/num_classes/pretrained_cfg, model.safetensors). The
references follow the published inference scripts, not our preprocessing code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captionkit.models.taggers import (
    FORMAT_CAPTIONKIT,
    FORMAT_WD_ONNX,
    FORMAT_WD_TIMM,
    ModelNotFoundError,
    TaggerLoadError,
    load_tagger,
)
from captionkit.train.tagger_synthetic import make_shapes_image

SIZE = 48
TAG_ROWS = [("general", 9), ("sensitive", 9), ("long_hair", 0), ("smile", 0), ("^_^", 0),
            ("hatsune_miku", 4), ("vocaloid", 3), ("some_artist", 1), ("highres", 5)]


def write_tags_csv(path: Path, rows=TAG_ROWS) -> None:
    lines = ["tag_id,name,category,count"] + [f"{i},{n},{c},{100 - i}" for i, (n, c) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def tiny_model(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_convnext", num_classes=len(TAG_ROWS)).eval()
    with torch.no_grad():  # spread the logits so thresholds and orders are meaningful
        head = model.get_classifier()
        head.weight.normal_(0, 2.0)
        head.bias.normal_(0, 1.0)
    return model


def images(count: int = 5) -> list[Image.Image]:
    rng = random.Random(3)
    sizes = [(64, 64), (80, 40), (30, 70), (SIZE, SIZE), (100, 90)]
    return [make_shapes_image(rng, sizes[i % len(sizes)])[0] for i in range(count)]


def pad_square_white(image: Image.Image) -> Image.Image:
    """As the WD reference scripts do it (centred paste on a white square)."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


@pytest.fixture(scope="module")
def wd_onnx_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A WD-style ONNX folder with a fixed batch size of 1, like the WD v2 exports."""
    folder = tmp_path_factory.mktemp("wd-onnx")
    model = tiny_model(1)

    class WD(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):  # NHWC, BGR, 0-255 (the model itself was trained on BGR)
            x = x.permute(0, 3, 1, 2) / 127.5 - 1.0
            return torch.sigmoid(self.model(x))

    torch.onnx.export(WD().eval(), (torch.rand(1, SIZE, SIZE, 3) * 255,), str(folder / "model.onnx"),
                      input_names=["input_1"], output_names=["predictions_sigmoid"], dynamo=True,
                      external_data=False, verbose=False)
    write_tags_csv(folder / "selected_tags.csv")
    return folder, model


@pytest.fixture(scope="module")
def wd_timm_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("wd-timm")
    model = tiny_model(2)
    config = {
        "architecture": "test_convnext",
        "num_classes": len(TAG_ROWS),
        "num_features": model.num_features,
        "global_pool": "avg",
        "model_args": {},
        "pretrained_cfg": {
            "custom_load": False, "input_size": [3, SIZE, SIZE], "fixed_input_size": False,
            "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": len(TAG_ROWS),
            "pool_size": None, "first_conv": None, "classifier": None,
        },
    }
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    write_tags_csv(folder / "selected_tags.csv")
    return folder, model


def test_wd_onnx_matches_the_reference_preprocessing_and_batches(wd_onnx_folder):
    folder, model = wd_onnx_folder
    tagger = load_tagger(str(folder), device="cpu")
    assert tagger.format == FORMAT_WD_ONNX
    assert tagger.tags[0] == "general" and tagger.categories[:3] == [9, 9, 0]
    assert tagger.preprocessing.size == (SIZE, SIZE) and tagger.preprocessing.layout == "NHWC"
    pictures = images()
    batch = np.stack([tagger.preprocess(image) for image in pictures])
    assert batch.shape == (len(pictures), SIZE, SIZE, 3)
    scores = tagger.predict(batch)  # fixed batch of 1 in the graph: split and padded internally
    assert scores.shape == (len(pictures), len(TAG_ROWS)) and scores.dtype == np.float32
    for image, row in zip(pictures, scores, strict=True):
        # wd-tagger Space reference: pad white, bicubic resize, RGB->BGR, float 0-255.
        array = np.asarray(pad_square_white(image).resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32)
        bgr = torch.from_numpy(array[:, :, ::-1].copy())[None]
        with torch.no_grad():
            expected = torch.sigmoid(model(bgr.permute(0, 3, 1, 2) / 127.5 - 1.0))[0].numpy()
        np.testing.assert_allclose(row, expected, atol=1e-5)
        single = tagger.predict(tagger.preprocess(image)[None])[0]
        np.testing.assert_allclose(single, row, atol=1e-6)
    assert tagger.default_thresholds["general"] == 0.35 and "per_tag" not in tagger.default_thresholds


def test_wd_timm_uses_pretrained_cfg_and_bgr_like_wdv3_timm(wd_timm_folder):
    from timm.data import create_transform, resolve_data_config

    folder, model = wd_timm_folder
    tagger = load_tagger(str(folder), device="cpu")
    assert tagger.format == FORMAT_WD_TIMM
    assert tagger.preprocessing.channel_order == "BGR" and tagger.preprocessing.layout == "NCHW"
    pictures = images()
    scores = tagger.predict(np.stack([tagger.preprocess(image) for image in pictures]))
    # neggles/wdv3-timm: timm eval transform of the white-padded image, then NCHW RGB->BGR.
    transform = create_transform(**resolve_data_config(json.loads((folder / "config.json").read_text())[
        "pretrained_cfg"]))
    for image, row in zip(pictures, scores, strict=True):
        inputs = transform(pad_square_white(image)).unsqueeze(0)[:, [2, 1, 0]]
        with torch.no_grad():
            expected = torch.sigmoid(model(inputs))[0].numpy()
        np.testing.assert_allclose(row, expected, atol=2e-3)  # torchvision vs PIL bicubic rounding
    tagger.unload()
    with pytest.raises(TaggerLoadError, match="unloaded"):
        tagger.predict(np.zeros((1, 3, SIZE, SIZE), dtype=np.float32))


def test_exported_folder_round_trips_through_timm_and_onnx_loaders(tmp_path):
    from captionkit.models.taggers import Preprocessing
    from captionkit.train.tagger_data import Vocabulary
    from captionkit.train.tagger_export import export_tagger

    model = tiny_model(3)
    vocabulary = Vocabulary([n for n, _ in TAG_ROWS], [c for _, c in TAG_ROWS], [5] * len(TAG_ROWS))
    per_tag = np.linspace(0.2, 0.8, len(TAG_ROWS)).astype(np.float32)
    preprocessing = Preprocessing(size=(SIZE, SIZE), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    folder = export_tagger(model, tmp_path / "tagger", architecture="test_convnext", model_args={},
                           vocabulary=vocabulary, preprocessing=preprocessing, threshold=0.4,
                           per_tag_thresholds=per_tag, onnx=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "config.json", "model.onnx", "model.safetensors", "preprocess.json", "selected_tags.csv",
        "thresholds.json"])
    timm_tagger = load_tagger(str(folder), device="cpu")
    onnx_tagger = load_tagger(str(folder / "model.onnx"), device="cpu")
    assert timm_tagger.format == FORMAT_CAPTIONKIT and onnx_tagger.format == FORMAT_WD_ONNX
    np.testing.assert_allclose(timm_tagger.default_thresholds["per_tag"], per_tag, atol=1e-6)
    np.testing.assert_allclose(onnx_tagger.default_thresholds["per_tag"], per_tag, atol=1e-6)
    assert timm_tagger.default_thresholds["general"] == pytest.approx(0.4)
    pictures = images()
    timm_scores = timm_tagger.predict(np.stack([timm_tagger.preprocess(i) for i in pictures]))
    onnx_scores = onnx_tagger.predict(np.stack([onnx_tagger.preprocess(i) for i in pictures]))
    np.testing.assert_allclose(onnx_scores, timm_scores, atol=1e-4)
    with torch.no_grad():  # and both equal the model on our own preprocessing
        direct = torch.sigmoid(model(torch.from_numpy(np.stack([preprocessing(i) for i in pictures])))).numpy()
    np.testing.assert_allclose(timm_scores, direct, atol=1e-5)
    assert timm_scores.std() > 0.05  # the scores are not all alike, so the comparison means something


def test_fingerprint_names_format_and_file_hashes(wd_timm_folder, tmp_path):
    import shutil

    folder, _ = wd_timm_folder
    fingerprint = load_tagger(str(folder), device="cpu").fingerprint()
    assert fingerprint["format"] == FORMAT_WD_TIMM
    assert set(fingerprint["files"]) >= {"model.safetensors", "config.json", "selected_tags.csv"}
    copy = shutil.copytree(folder, tmp_path / "copy")
    write_tags_csv(copy / "selected_tags.csv", [(n + "_x", c) for n, c in TAG_ROWS])
    changed = load_tagger(str(copy), device="cpu").fingerprint()
    assert changed["files"]["selected_tags.csv"] != fingerprint["files"]["selected_tags.csv"]
    assert changed["files"]["model.safetensors"] == fingerprint["files"]["model.safetensors"]


def test_hub_id_offline_points_to_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="--model LOCAL_FOLDER"):
        load_tagger("SmilingWolf/wd-does-not-exist-v3", cache_dir=tmp_path)


def test_gpu_request_without_cuda_provider_fails_loudly(wd_onnx_folder, monkeypatch):
    import onnxruntime

    folder, _ = wd_onnx_folder
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(TaggerLoadError, match="onnxruntime-gpu"):
        load_tagger(str(folder), device="cuda")
    if not torch.cuda.is_available():  # the timm path refuses too, instead of running on the CPU
        from captionkit.models.taggers import _torch_device

        with pytest.raises(TaggerLoadError, match="no CUDA GPU.*--device cpu"):
            _torch_device("cuda")


def test_broken_folders_name_the_file_and_the_fix(wd_timm_folder, tmp_path):
    import shutil

    with pytest.raises(TaggerLoadError, match="not a tagger folder"):
        load_tagger(str(tmp_path), device="cpu")
    folder, _ = wd_timm_folder
    copy = shutil.copytree(folder, tmp_path / "no-tags")
    (copy / "selected_tags.csv").unlink()
    with pytest.raises(TaggerLoadError, match="selected_tags.csv is missing"):
        load_tagger(str(copy), device="cpu")
    wrong = shutil.copytree(folder, tmp_path / "wrong-count")
    write_tags_csv(wrong / "selected_tags.csv", TAG_ROWS[:3])
    with pytest.raises(TaggerLoadError, match="3 tags"):
        load_tagger(str(wrong), device="cpu")


def test_decode_workers_read_the_preprocessing_without_the_weights(wd_onnx_folder, wd_timm_folder):
    """Ray's CPU stage prepares images with ``load_preprocessing``: the same as the loaded tagger's."""
    from captionkit.models.taggers import load_preprocessing

    for folder in (wd_onnx_folder[0], wd_timm_folder[0]):
        assert load_preprocessing(str(folder)) == load_tagger(str(folder), device="cpu").preprocessing


def test_the_vocabulary_for_the_store_is_read_without_the_weights(wd_onnx_folder, wd_timm_folder):
    """Ray's driver asks for it before any worker loads the model: the same as the loaded model's."""
    from captionkit.steps.tagger import TagStep

    for folder in (wd_onnx_folder[0], wd_timm_folder[0]):
        step = TagStep(str(folder), store=None, device="cpu")
        before = step.shared_meta()
        step.load()
        assert step.shared_meta() == before and len(next(iter(before.values()))["tags"]) > 0
