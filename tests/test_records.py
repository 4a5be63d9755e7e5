"""Sources: folders (recursive, hidden, symlink loops, every Pillow format), single images, manifests."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as parquet
import pytest

from captionkit.core.errors import SourceError
from captionkit.core.records import open_source
from tests.images import noise_image


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for relative in ("a.jpg", "b.PNG", "sub/c.webp", "sub/deeper/d.bmp", "sub/e.gif", "f.tiff", ".secret.png",
                     ".hidden/g.png"):
        noise_image(1, (16, 16)).save(root / relative)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    return root


def test_folder_recursive_ids_are_relative_posix_paths(tree):
    ids = [record.id for record in open_source(tree)]
    assert ids == ["a.jpg", "b.PNG", "f.tiff", "sub/c.webp", "sub/e.gif", "sub/deeper/d.bmp"]


def test_folder_without_recursion_and_with_hidden(tree):
    assert [r.id for r in open_source(tree, recursive=False)] == ["a.jpg", "b.PNG", "f.tiff"]
    hidden = [r.id for r in open_source(tree, recursive=False, include_hidden=True)]
    assert ".secret.png" in hidden
    assert ".hidden/g.png" in [r.id for r in open_source(tree, include_hidden=True)]


def test_single_image_source(tree):
    records = list(open_source(tree / "sub" / "c.webp"))
    assert [(r.id, r.path) for r in records] == [("c.webp", (tree / "sub" / "c.webp").resolve())]


def _rows(tree):
    return [{"file_name": "a.jpg", "source": "x"}, {"file_name": "sub/c.webp", "source": "y"}]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_manifests_of_every_kind(tree, kind):
    rows = _rows(tree)
    manifest = tree / f"manifest.{kind}"
    if kind == "jsonl":
        manifest.write_text("\n".join(json.dumps(row) for row in rows))
    elif kind == "json":
        manifest.write_text(json.dumps(rows))
    elif kind in ("csv", "tsv"):
        with manifest.open("w", newline="") as stream:
            delimiter = "\t" if kind == "tsv" else ","
            writer = csv.DictWriter(stream, fieldnames=["file_name", "source"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    else:
        parquet.write_table(pa.Table.from_pylist(rows), manifest)
    records = list(open_source(manifest))
    assert [r.id for r in records] == ["a.jpg", "sub/c.webp"]
    assert records[1].path == tree / "sub" / "c.webp"
    assert records[0].fields == {"source": "x"}


def test_manifest_with_named_column_and_base_folder(tmp_path, tree):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"picture": "sub/e.gif"}) + "\n")
    records = list(open_source(manifest, image_column="picture", base_dir=tree))
    assert records[0].id == "sub/e.gif" and records[0].path.exists()
    with pytest.raises(SourceError, match="column 'nope' not found"):
        list(open_source(manifest, image_column="nope", base_dir=tree))
    with pytest.raises(SourceError, match="--image-column"):
        list(open_source(manifest, base_dir=tree))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source(tmp_path / "nothing")


def test_csv_with_a_byte_order_mark(tree):
    manifest = tree / "excel.csv"
    manifest.write_text("image,caption\na.jpg,x\n", encoding="utf-8-sig")
    assert [r.id for r in open_source(manifest)] == ["a.jpg"]
