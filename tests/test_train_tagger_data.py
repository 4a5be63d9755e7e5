"""Tagger training data: folders, vocabulary with count threshold, splits, parquet prepare."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captionkit.train.tagger_data import (
    EpochSampler,
    TaggerDataError,
    Vocabulary,
    encode,
    prepare_from_parquet,
    read_tag_file,
    scan_tagged_folders,
    split_indices,
)


def make_folder(root: Path, rows: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stem, tags in rows.items():
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / f"{stem}.png")
        if tags is not None:
            (root / f"{stem}.txt").write_text(tags, encoding="utf-8")
    return root


def test_scan_reads_tag_files_with_the_configured_separator(tmp_path):
    make_folder(tmp_path / "a", {"x": "long hair | smile |smile", "y": "cat", "no_tags": None})
    items = scan_tagged_folders([tmp_path / "a"], separator="|")
    assert [item.path.name for item in items] == ["x.png", "y.png"]  # no tag file: skipped
    assert items[0].tags == ["long hair", "smile"]
    (tmp_path / "lines.txt").write_text("a\nb, c\n", encoding="utf-8")
    assert read_tag_file(tmp_path / "lines.txt", ",") == ["a", "b", "c"]
    with pytest.raises(TaggerDataError, match="training folder not found"):
        scan_tagged_folders([tmp_path / "missing"])


def test_vocabulary_csv_count_threshold_and_unknown_tags_logged(tmp_path, caplog):
    csv_path = tmp_path / "selected_tags.csv"
    csv_path.write_text("tag_id,name,category,count\n0,long_hair,0,50\n1,smile,0,3\n2,miku,4,20\n",
                        encoding="utf-8")
    vocabulary = Vocabulary.from_csv(csv_path, min_count=10)
    assert vocabulary.names == ["long_hair", "miku"] and vocabulary.categories == [0, 4]
    make_folder(tmp_path / "d", {"x": "long hair, smile, miku, unknown_tag", "y": "unknown_tag"})
    items = scan_tagged_folders([tmp_path / "d"])
    with caplog.at_level(logging.INFO):
        encoded = encode(items, vocabulary)
    assert [row.tolist() for row in encoded.labels] == [[0, 1], []]
    assert encoded.unknown == Counter({"unknown_tag": 2, "smile": 1})
    assert "3 tag occurrences (2 distinct tags) are not in the vocabulary" in caplog.text
    only_names = tmp_path / "names.csv"
    only_names.write_text("name\nb\na\n", encoding="utf-8")
    assert Vocabulary.from_csv(only_names).names == ["b", "a"]
    with pytest.raises(TaggerDataError, match="needs a 'count' column"):
        Vocabulary.from_csv(only_names, min_count=2)


def test_vocabulary_from_counts_and_csv_round_trip(tmp_path):
    vocabulary = Vocabulary.from_counts(Counter({"a": 5, "b": 1, "c": 9}), min_count=2)
    assert vocabulary.names == ["c", "a"]
    vocabulary.write_csv(tmp_path / "v.csv", best_thresholds=[0.3, 0.7])
    again = Vocabulary.from_csv(tmp_path / "v.csv")
    assert again.names == ["c", "a"] and again.counts == [9, 5]
    assert "best_threshold" in (tmp_path / "v.csv").read_text().splitlines()[0]


def _labels(count: int, num_tags: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # a few rare tags, so a random split may miss them and a stratified one must not
    probabilities = np.array([0.5, 0.3, 0.2, 0.05, 0.05, 0.03])[:num_tags]
    return [np.nonzero(rng.random(num_tags) < probabilities)[0].astype(np.int32) for _ in range(count)]


def test_stratified_split_keeps_rare_tags_in_both_parts():
    labels = _labels(400, 6)
    train, val, method = split_indices(labels, 6, 0.2, method="stratified", seed=0)
    assert method == "stratified"
    assert len(val) == 80 and len(set(train) | set(val)) == 400 and not set(train) & set(val)
    dense = np.zeros((400, 6))
    for i, rows in enumerate(labels):
        dense[i, rows] = 1
    share = dense[val].sum(0) / np.maximum(1, dense.sum(0))
    assert np.all(np.abs(share - 0.2) < 0.05), share


def test_auto_split_falls_back_to_random_when_the_matrix_is_too_big():
    labels = _labels(300, 6)
    _, _, method = split_indices(labels, 6, 0.1, method="auto", max_stratified_cells=1000)
    assert method == "random"
    _, _, method = split_indices(labels, 6, 0.1, method="auto")
    assert method == "stratified"
    with pytest.raises(TaggerDataError, match="max_stratified_cells"):
        split_indices(labels, 6, 0.1, method="stratified", max_stratified_cells=1000)
    a = split_indices(labels, 6, 0.1, method="random", seed=3)
    b = split_indices(labels, 6, 0.1, method="random", seed=3)
    assert np.array_equal(a[1], b[1])


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    sampler = EpochSampler(50, seed=7, shuffle=True)
    sampler.set_epoch(3)
    first = list(sampler)
    other = EpochSampler(50, seed=7, shuffle=True)
    other.set_epoch(3)
    assert list(other) == first and sorted(first) == list(range(50))
    other.set_epoch(4)
    assert list(other) != first
    shards = [list(EpochSampler(50, 7, True, rank, 2)) for rank in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(50))


def test_prepare_from_a_danbooru_style_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = tmp_path / "raw"
    images.mkdir()
    for name in ["1.png", "2.png", "3.jpg"]:
        Image.new("RGB", (8, 8)).save(images / name)
    table = pa.table({
        "id": [1, 2, 3, 4],
        "file_path": ["raw/1.png", "raw/2.png", "raw/3.jpg", "raw/missing.png"],
        "rating": ["g", "s", "e", "g"],
        "tag_string_general": ["1girl long_hair smile", "1girl smile", "1girl", "1girl"],
        "tag_string_character": ["hatsune_miku", "", "hatsune_miku", ""],
        "tag_string_copyright": ["vocaloid", "", "vocaloid", ""],
        "tag_string_artist": ["someone", "", "", ""],
        "tag_string_meta": ["highres", "highres", "", ""],
    })
    pq.write_table(table, tmp_path / "meta.parquet")
    result = prepare_from_parquet(tmp_path / "meta.parquet", tmp_path / "out", min_count=2, link="copy")
    assert result.images == 3 and result.skipped_missing == 1
    out = tmp_path / "out" / "images"
    written = (out / "1.txt").read_text()
    assert written == "general, hatsune_miku, vocaloid, someone, 1girl, long_hair, smile, highres\n"
    assert (out / "3.txt").read_text().startswith("explicit, hatsune_miku")
    vocabulary = Vocabulary.from_csv(tmp_path / "out" / "selected_tags.csv")
    assert vocabulary.names == ["1girl", "hatsune_miku", "highres", "smile", "vocaloid"]
    assert dict(zip(vocabulary.names, vocabulary.categories, strict=True)) == {
        "1girl": 0, "hatsune_miku": 4, "highres": 5, "smile": 0, "vocaloid": 3}
    assert dict(zip(vocabulary.names, vocabulary.counts, strict=True))["1girl"] == 3
    # the result is a training folder as it stands
    items = scan_tagged_folders([out], separator=",")
    assert len(items) == 3 and "hatsune_miku" in items[0].tags
    with pytest.raises(TaggerDataError, match="--image-column"):
        prepare_from_parquet(tmp_path / "meta.parquet", tmp_path / "o2", image_column="path")
