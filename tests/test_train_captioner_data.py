"""Captioner data: every source layout, long-caption policy, augmentation that reaches batches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
from PIL import Image

from captionkit.train.captioner_data import (
    AugmentConfig,
    CaptionCollator,
    CaptionDataset,
    DataReport,
    DatasetSpec,
    EpochBatchSampler,
    augment_caption,
    check_caption_lengths,
    load_items,
    split_items,
    write_shapes_dataset,
)


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "red").save(path)
    return path


def test_kohya_folder_is_recursive_with_configurable_extension(tmp_path):
    image(tmp_path / "a.png").with_suffix(".caption").write_text("one")
    image(tmp_path / "sub" / "b.jpg").with_suffix(".caption").write_text("two\n")
    image(tmp_path / "sub" / "c.png").with_suffix(".txt").write_text("ignored: wrong extension")
    report = DataReport()
    items = load_items(DatasetSpec(path=tmp_path, caption_extension=".caption", task="<OCR>"), report)
    assert sorted((item.image.name, item.caption, item.task) for item in items) == [
        ("a.png", "one", "<OCR>"), ("b.jpg", "two", "<OCR>")]
    assert report.missing_captions == [str(tmp_path / "sub" / "c.png")]
    flat = load_items(DatasetSpec(path=tmp_path, caption_extension=".caption", recursive=False))
    assert [item.image.name for item in flat] == ["a.png"]


def test_metadata_jsonl_imagefolder_convention(tmp_path):
    image(tmp_path / "x" / "1.png")
    rows = [{"file_name": "x/1.png", "text": "a caption"}, {"file_name": "x/missing.png", "text": "gone"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    report = DataReport()
    items = load_items(DatasetSpec(path=tmp_path), report)
    assert [(item.image, item.caption) for item in items] == [(tmp_path / "x" / "1.png", "a caption")]
    assert report.missing_images == [str(tmp_path / "x" / "missing.png")]


def test_jsonl_and_parquet_manifests_with_path_and_caption_columns(tmp_path):
    first = image(tmp_path / "imgs" / "1.png")
    second = image(tmp_path / "imgs" / "2.png")
    rows = [{"id": "1", "path": str(first), "caption": "red"}, {"id": "2", "path": "imgs/2.png", "caption": "blue"}]
    (tmp_path / "export.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "export.parquet")
    for name in ("export.jsonl", "export.parquet"):
        items = load_items(DatasetSpec(path=tmp_path / name, repeats=2))
        assert [(item.image, item.caption) for item in items] == [(first, "red"), (second, "blue")] * 2
    renamed = [{"file": str(first), "desc": "green"}]
    (tmp_path / "custom.jsonl").write_text(json.dumps(renamed[0]))
    items = load_items(DatasetSpec(path=tmp_path / "custom.jsonl", path_column="file", caption_column="desc"))
    assert items[0].caption == "green"
    with pytest.raises(ValueError, match="found no caption column.*caption_column"):
        load_items(DatasetSpec(path=tmp_path / "custom.jsonl", path_column="file"))


def test_bad_sources_name_the_file_and_fix(tmp_path):
    with pytest.raises(ValueError, match="data set path not found"):
        load_items(DatasetSpec(path=tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image/caption pairs"):
        load_items(DatasetSpec(path=tmp_path / "empty"))
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        load_items(DatasetSpec(path=tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="caption_extension must start with a dot"):
        DatasetSpec(path=tmp_path, caption_extension="txt")


def test_split_is_by_image_and_deterministic(tmp_path):
    write_shapes_dataset(tmp_path, 20, seed=3)
    items = load_items(DatasetSpec(path=tmp_path, repeats=2))
    train, val = split_items(items, 0.25, seed=1)
    assert len(val) == 5 and len(train) == 30
    assert not {item.image for item in val} & {item.image for item in train}
    assert split_items(items, 0.25, seed=1) == (train, val)


def test_augment_caption_keeps_frozen_parts_and_drops():
    caption = "trigger, a, b, c, d, e"
    config = AugmentConfig(shuffle_parts=True, keep_first_parts=1)
    outputs = {augment_caption(caption, config, random.Random(seed)) for seed in range(30)}
    assert len(outputs) > 5
    for output in outputs:
        parts = output.split(", ")
        assert parts[0] == "trigger" and sorted(parts[1:]) == ["a", "b", "c", "d", "e"]
    dropped = augment_caption(caption, AugmentConfig(part_dropout=1.0, keep_first_parts=2), random.Random(0))
    assert dropped == "trigger, a"
    assert augment_caption(caption, AugmentConfig(caption_dropout=1.0), random.Random(0)) == ""


def batches_of(processor, dataset, epoch, batch_size=4):
    dataset.set_epoch(epoch)
    collator = CaptionCollator(processor, 64)
    sampler = EpochBatchSampler(len(dataset), batch_size, seed=0)
    sampler.set_epoch(epoch)
    return [collator([dataset[index] for index in batch]) for batch in sampler]


def decoded_targets(processor, batch) -> list[str]:
    labels = batch["labels"].clone()
    labels[labels == -100] = processor.tokenizer.pad_token_id
    return [text.strip() for text in processor.tokenizer.batch_decode(labels, skip_special_tokens=True)]


@pytest.fixture(scope="module")
def processor(tiny_florence):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_florence)


@pytest.fixture
def tag_dataset(tmp_path):
    for number in range(8):
        image(tmp_path / f"{number}.png").with_suffix(".txt").write_text(
            "red, circle, square, triangle, star, dot")
    return load_items(DatasetSpec(path=tmp_path))


def test_shuffle_with_frozen_parts_reaches_the_batches(processor, tag_dataset):
    dataset = CaptionDataset(tag_dataset, AugmentConfig(shuffle_parts=True, keep_first_parts=1), seed=0)
    targets = [text for batch in batches_of(processor, dataset, 0) for text in decoded_targets(processor, batch)]
    assert len(set(targets)) > 3
    assert all(text.startswith("red, ") for text in targets)
    assert all(sorted(text.split(", ")[1:]) == ["circle", "dot", "square", "star", "triangle"] for text in targets)
    again = [text for batch in batches_of(processor, dataset, 0) for text in decoded_targets(processor, batch)]
    assert again == targets  # same (seed, epoch, index) -> same captions, so resume sees the same data
    other_epoch = [text for batch in batches_of(processor, dataset, 1) for text in decoded_targets(processor, batch)]
    assert other_epoch != targets


def test_part_and_caption_dropout_reach_the_batches(processor, tag_dataset):
    dataset = CaptionDataset(tag_dataset, AugmentConfig(part_dropout=0.5, keep_first_parts=1), seed=0)
    targets = [text for batch in batches_of(processor, dataset, 0) for text in decoded_targets(processor, batch)]
    assert all(text.startswith("red") for text in targets)
    assert any(len(text.split(", ")) < 6 for text in targets)
    dataset = CaptionDataset(tag_dataset, AugmentConfig(caption_dropout=0.5), seed=0)
    targets = [text for batch in batches_of(processor, dataset, 0) for text in decoded_targets(processor, batch)]
    assert "" in targets and "red, circle, square, triangle, star, dot" in targets


def test_collator_masks_pads_and_truncates(processor, tmp_path):
    image(tmp_path / "a.png").with_suffix(".txt").write_text("a red circle")
    image(tmp_path / "b.png").with_suffix(".txt").write_text("a red circle and a blue square and a green star")
    dataset = CaptionDataset(load_items(DatasetSpec(path=tmp_path)))
    batch = CaptionCollator(processor, 64)([dataset[0], dataset[1]])
    short = processor.tokenizer("a red circle")["input_ids"]
    assert batch["labels"][0, : len(short)].tolist() == short
    assert (batch["labels"][0, len(short):] == -100).all()
    assert (batch["labels"][1] != -100).all()
    truncated = CaptionCollator(processor, 4)([dataset[1]])
    assert truncated["labels"].shape[1] == 4


def test_bad_image_is_skipped_not_fatal(processor, tmp_path):
    image(tmp_path / "ok.png").with_suffix(".txt").write_text("fine")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "broken.txt").write_text("broken")
    dataset = CaptionDataset(load_items(DatasetSpec(path=tmp_path)))
    batch = CaptionCollator(processor, 16)([dataset[index] for index in range(len(dataset))])
    assert batch["captions"] == ["fine"]


def test_long_captions_are_reported_then_truncated_or_skipped(processor, tmp_path):
    image(tmp_path / "a.png").with_suffix(".txt").write_text("a red circle")
    image(tmp_path / "b.png").with_suffix(".txt").write_text("a red circle and a blue square and a green star")
    items = load_items(DatasetSpec(path=tmp_path))
    report = DataReport()
    assert len(check_caption_lengths(items, processor.tokenizer, 8, "truncate", report)) == 2
    assert report.long_captions == [str(tmp_path / "b.png")]
    report = DataReport()
    kept = check_caption_lengths(items, processor.tokenizer, 8, "skip", report)
    assert [item.caption for item in kept] == ["a red circle"] and report.long_captions_skipped == 1


def test_sampler_resumes_mid_epoch_and_shards():
    sampler = EpochBatchSampler(10, 3, seed=5)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=2)
    assert list(sampler) == full[2:]
    assert sorted(index for batch in full for index in batch) == list(range(10))
    shards = [EpochBatchSampler(10, 3, seed=5, process_index=rank, num_processes=2) for rank in (0, 1)]
    for shard in shards:
        shard.set_epoch(2)
    assert [list(shard) for shard in shards] == [full[0::2][:2], full[1::2][:2]]
