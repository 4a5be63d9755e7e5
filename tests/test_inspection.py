"""`captionkit inspect`: a generated data set with every planted problem is caught, a clean one passes.

The data sets are built here: 12 clean images (bucket-shaped, distinct, captioned with the
trigger, tagged consistently) and, for the planted set, one extra file per problem. The
target resolution is 256 with buckets from 128 to 512 so the images stay small.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from captionkit import api
from captionkit.inspection import KINDS, inspect_dataset, resolve_fail_on
from captionkit.inspection.buckets import Buckets, make_bucket_resolutions
from captionkit.inspection.contradictions import find_contradictions
from captionkit.inspection.hashing import near_duplicate_pairs
from tests.in_process import run_cli

SMALL = {"resolution": 256, "min_bucket": 128, "max_bucket": 512, "trigger": "ohwx", "tag_ext": ".tags",
         "workers": 2}
SMALL_CLI = ["--resolution", "256", "--min-bucket", "128", "--max-bucket", "512", "--trigger", "ohwx",
             "--tag-ext", ".tags", "--workers", "2", "-q"]
GENDERS = [("1girl", "woman"), ("1boy", "man")]
HAIR = ["black", "blonde", "red", "brown"]
PLACES = [("outdoors", "outdoors in a garden"), ("indoors", "indoors by a window"),
          ("simple_background", "against a plain backdrop")]
SHAPES = [(256, 256), (320, 192), (192, 320)]  # exact buckets at 256: no upscale, no crop


def picture(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A distinct picture: a coloured background with large random shapes (a stable perceptual hash)."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(width // 6, width // 2)), y0 + int(rng.integers(height // 6, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=colour)
    return image


def write_clean(folder: Path, extra_tag: str | None = None) -> None:
    """12 images, each with a distinct caption that names the trigger and agrees with its tags."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(12):
        gender_tag, noun = GENDERS[index % 2]
        hair = HAIR[index % 4]
        place_tag, place = PLACES[index % 3]
        picture(index, SHAPES[index % 3]).save(folder / f"img{index:02d}.png")
        (folder / f"img{index:02d}.txt").write_text(
            f"ohwx, a {noun} with {hair} hair {place}, photo number {index}", encoding="utf-8")
        tags = [gender_tag, f"{hair}_hair", place_tag] + ([extra_tag] if extra_tag else [])
        (folder / f"img{index:02d}.tags").write_text(", ".join(tags), encoding="utf-8")


LONG_CAPTION = "ohwx, " + " ".join(
    f"a detailed view of a mountain valley with river number {i} under warm evening light," for i in range(30))


def write_planted(folder: Path) -> None:
    """The clean set plus one file per problem (see EXPECTED)."""
    write_clean(folder, extra_tag="highres")  # highres: a tag on every image

    def image(name: str, seed: int, caption: str | bytes | None, size=(256, 256), tags="highres, landscape"):
        picture(seed, size).save(folder / name)
        stem = Path(name).stem
        if isinstance(caption, bytes):
            (folder / f"{stem}.txt").write_bytes(caption)
        elif caption is not None:
            (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
        (folder / f"{stem}.tags").write_text(tags, encoding="utf-8")

    image("p_long.png", 101, LONG_CAPTION)
    image("p_empty.png", 102, "  \n")
    image("p_missing.png", 103, None)
    (folder / "orphan.txt").write_text("ohwx, a caption whose image was deleted", encoding="utf-8")
    image("p_loop.png", 104, "ohwx, a cat sitting on a mat a cat sitting on a mat a cat sitting on a mat "
                             "a cat sitting on a mat")
    image("p_refusal.png", 105, "I'm sorry, but I cannot describe ohwx in this image.")
    image("p_filler.png", 106, "The image shows ohwx, a tall lighthouse on a rocky coast.")
    image("p_dup_a.png", 107, "ohwx, a red bicycle leaning on a brick wall.")
    image("p_dup_b.png", 108, "ohwx, a red bicycle leaning on a brick wall.")
    image("p_notrigger.png", 109, "a bowl of fruit on a wooden table.")
    image("p_latin1.png", 110, "ohwx, a café on the corner of a quiet street".encode("cp1252"))
    image("p_bom.png", 111, "\ufeffohwx, a sailing boat at dusk".encode())
    image("p_tiny.png", 112, "ohwx, a tiny thumbnail of a tree", size=(40, 40))
    image("p_small.png", 113, "ohwx, a small photo of a bridge", size=(200, 200))
    image("p_wide.png", 114, "ohwx, a very wide panorama of hills", size=(1200, 200))
    image("p_exact_a.png", 115, "ohwx, a green door in an old house")
    shutil.copyfile(folder / "p_exact_a.png", folder / "p_exact_b.png")
    (folder / "p_exact_b.txt").write_text("ohwx, the same green door again", encoding="utf-8")
    (folder / "p_exact_b.tags").write_text("highres, landscape", encoding="utf-8")
    near = ImageEnhance.Brightness(Image.open(folder / "img00.png").convert("RGB")).enhance(1.06)
    ImageDraw.Draw(near).rectangle([10, 10, 16, 16], fill=(255, 255, 255))
    near = near.resize((272, 272), Image.Resampling.BICUBIC)  # resized, brightened, marked, re-encoded
    near.save(folder / "p_near.jpg", quality=90)
    (folder / "p_near.txt").write_text("ohwx, a brighter copy of the first photo", encoding="utf-8")
    (folder / "p_near.tags").write_text("highres, landscape", encoding="utf-8")
    (folder / "p_broken.png").write_text("this is not an image")
    (folder / "p_broken.txt").write_text("ohwx, a file that is not an image", encoding="utf-8")
    (folder / "p_broken.tags").write_text("highres, landscape", encoding="utf-8")
    picture(116).save(folder / "p_truncated.jpg", quality=90)
    data = (folder / "p_truncated.jpg").read_bytes()
    (folder / "p_truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "p_truncated.txt").write_text("ohwx, half of a jpeg file", encoding="utf-8")
    (folder / "p_truncated.tags").write_text("highres, landscape", encoding="utf-8")
    image("p_rare.png", 117, "ohwx, an umbrella on a rainy street", tags="highres, landscape, umbrella")
    image("p_contra.png", 118, "ohwx, a woman walking her dog in a park.", tags="highres, 1boy, landscape")
    image("p_unclean.png", 119, "ohwx, a kite\x01 over a \x1b[1mbeach\ufffd\nat noon\n")


EXPECTED = {
    "caption_missing": {"p_missing.png"},
    "caption_empty": {"p_empty.png"},
    "caption_too_long": {"p_long.png"},
    "caption_loop": {"p_loop.png"},
    "caption_refusal": {"p_refusal.png"},
    "caption_filler_opener": {"p_filler.png"},
    "duplicate_caption": {"p_dup_a.png"},
    "trigger_missing": {"p_notrigger.png"},
    "orphan_caption": {"orphan.txt"},
    "file_not_utf8": {"p_latin1.txt"},
    "file_bom": {"p_bom.txt"},
    "image_unreadable": {"p_broken.png", "p_truncated.jpg"},
    "image_tiny": {"p_tiny.png"},
    "image_below_resolution": {"p_small.png"},
    "odd_aspect_ratio": {"p_wide.png"},
    "duplicate_image": {"p_exact_a.png"},
    "near_duplicate_image": {"img00.png"},
    "rare_tag": {"p_rare.png"},
    "ubiquitous_tag": {"img00.png"},
    "tag_caption_contradiction": {"p_contra.png"},
    "caption_unclean_text": {"p_unclean.png"},
}


def _tree(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder`` with its size, mtime and hash: proof that nothing changed."""
    return {path.relative_to(folder).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns,
                                                  hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(folder.rglob("*")) if path.is_file() and not path.is_symlink()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("planted") / "data"
    write_planted(folder)
    return folder


@pytest.fixture(scope="module")
def planted_report(planted, tmp_path_factory):
    before = _tree(planted)
    out = tmp_path_factory.mktemp("reports")
    report = api.inspect(planted, report=out / "report.html", json_report=out / "report.json", **SMALL)
    assert _tree(planted) == before, "inspection changed the data set"
    return report, out


def test_every_planted_problem_is_found(planted_report):
    report, _ = planted_report
    found = {kind: {finding.file for finding in report.by_kind(kind)} for kind in KINDS}
    for kind, files in EXPECTED.items():
        assert found[kind] == files, f"{kind}: expected {files}, found {found[kind]}"
    assert found["caption_too_long_t5"] == set()  # no T5 tokenizer here: not checked, and the report says so
    assert any("T5 token counts not checked" in note for note in report.notes)


def test_planted_details(planted_report):
    report, _ = planted_report
    (long,) = report.by_kind("caption_too_long")
    assert long.details["tokens"] > 77 and long.details["limit"] == 77
    (group,) = report.by_kind("duplicate_caption")
    assert group.files == ["p_dup_a.png", "p_dup_b.png"]
    (exact,) = report.by_kind("duplicate_image")
    assert exact.files == ["p_exact_a.png", "p_exact_b.png"]
    (near,) = report.by_kind("near_duplicate_image")
    assert near.details["other"] == "p_near.jpg" and near.details["distance"] <= 6
    unreadable = {finding.file: finding.message for finding in report.by_kind("image_unreadable")}
    assert "not an image Pillow can read" in unreadable["p_broken.png"]  # the core's own message
    assert "truncated" in unreadable["p_truncated.jpg"]
    (tiny,) = report.by_kind("image_tiny")
    assert tiny.details["scale"] > 1
    (small,) = report.by_kind("image_below_resolution")
    assert small.details == {"width": 200, "height": 200, "bucket": "256x256", "scale": 1.28, "crop": 0.0}
    (wide,) = report.by_kind("odd_aspect_ratio")
    assert wide.details["bucket"] == "512x128" and wide.details["crop"] > 0.3
    (rare,) = report.by_kind("rare_tag")
    assert rare.details == {"tag": "umbrella", "count": 1}
    (common,) = report.by_kind("ubiquitous_tag")
    assert common.details["tag"] == "highres" and common.details["fraction"] == 1.0
    (contradiction,) = report.by_kind("tag_caption_contradiction")
    assert contradiction.details["tag"] == "1boy" and "woman" in contradiction.details["caption_words"]
    (loop,) = report.by_kind("caption_loop")
    assert loop.details["collapsed"] == "ohwx, a cat sitting on a mat"
    assert "Windows-1252" in report.by_kind("file_not_utf8")[0].message
    (unclean,) = report.by_kind("caption_unclean_text")
    assert unclean.message == "has 2 control characters, 1 U+FFFD replacement character, 1 line break"
    assert unclean.details["caption"] == "ohwx, a kite\\x01 over a \\x1b[1mbeach\\ufffd\\nat noon"
    assert report.counts["images"] == 12 + 22
    assert report.stats["tags"]["frequency"]["highres"] == report.counts["tagged"]


def test_clean_data_set_has_no_findings(tmp_path):
    folder = tmp_path / "clean"
    write_clean(folder)
    report = inspect_dataset(folder, **SMALL)
    assert [(finding.kind, finding.file) for finding in report.findings] == []
    assert report.counts == {"images": 12, "readable_images": 12, "unreadable_images": 0, "with_caption": 12,
                             "tagged": 12, "text_files": 24, "orphan_text_files": 0}
    full = inspect_dataset(folder, full=True, **SMALL)
    assert full.findings == [] and full.settings["mode"] == "full"


def test_json_report_structure(planted_report):
    report, out = planted_report
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert data["captionkit_inspect"] == 1
    assert set(data) >= {"dataset", "source", "root", "settings", "counts", "summary", "severity", "kinds",
                         "findings", "stats", "notes", "generated_at"}
    assert data["source"] == "folder"
    assert set(data["summary"]) == set(KINDS)
    assert data["summary"]["caption_refusal"] == 1
    assert sum(data["summary"].values()) == len(data["findings"]) == len(report.findings)
    for finding in data["findings"]:
        assert set(finding) >= {"kind", "severity", "file", "path", "message", "details"}
        assert finding["severity"] == KINDS[finding["kind"]].severity
        assert Path(finding["path"]).is_absolute()
    assert data["stats"]["captions"]["clip_tokens"]["over_limit"] == 1
    assert data["stats"]["images"]["buckets"]["counts"]["256x256"] >= 4
    assert data["settings"]["mode"] == "headers+perceptual-hash"
    assert data["stats"]["tags"]["long_tail"]["tags_below"] == 1


def test_html_report_is_self_contained(planted_report):
    _, out = planted_report
    text = (out / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"https?://", text), "the report refers to the network"
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) >= 6 and all(source.startswith("data:image/png;base64,") for source in sources)
    assert "<script" not in text and "<link" not in text
    links = re.findall(r'href="([^"#][^"]*)"', text)
    assert links and all(not link.startswith(("/", "http")) for link in links)
    for link in links:  # relative links from the report's folder to the offending files
        assert (out / link.replace("%20", " ")).exists(), link
    for kind in EXPECTED:
        assert f"id='{kind}'" in text


def test_header_only_mode_skips_decoding(planted):
    report = inspect_dataset(planted, near_duplicates=False, **SMALL)
    assert report.settings["mode"] == "header-only"
    assert report.by_kind("near_duplicate_image") == []
    assert {f.file for f in report.by_kind("image_unreadable")} == {"p_broken.png"}  # truncation needs decoding
    assert {f.file for f in report.by_kind("duplicate_image")} == {"p_exact_a.png"}
    assert any("Header-only" in note for note in report.notes)


def test_full_mode_matches_default(planted, planted_report):
    full = inspect_dataset(planted, full=True, **SMALL)
    default, _ = planted_report
    assert sorted((f.kind, f.file) for f in full.findings) == sorted((f.kind, f.file) for f in default.findings)


def test_t5_token_counts_with_a_local_tokenizer(planted, tmp_path):
    from captionkit.testing.diffusion import build_t5_tokenizer

    build_t5_tokenizer().save_pretrained(tmp_path / "t5")
    report = inspect_dataset(planted, t5_tokenizer=tmp_path / "t5", near_duplicates=False, **SMALL)
    assert {finding.file for finding in report.by_kind("caption_too_long_t5")} == {"p_long.png"}
    assert report.stats["captions"]["t5_tokens"]["count"] > 0
    assert any("T5 token counts use" in note for note in report.notes)


def _store_data_set(folder: Path) -> None:
    from captionkit.core.images import load_image
    from captionkit.core.store import Result, Store, file_signature

    folder.mkdir()
    for index in range(6):
        picture(200 + index).save(folder / f"s{index}.png")
    captions = {"s0.png": "ohwx, a woman reading a book", "s1.png": "I'm sorry, I can't help with that.",
                "s2.png": "ohwx, a man riding a horse", "s3.png": "ohwx, a quiet lake",
                "s4.png": "ohwx, a woman by the sea"}
    tags = {"s0.png": "1girl, book", "s1.png": "1girl, book", "s2.png": "1girl, horse", "s3.png": "no_humans, lake",
            "s4.png": "1girl, book, hatsune miku", "s5.png": "1girl, horse"}
    with Store(folder) as store:
        results = []
        for name in sorted(tags):
            path = folder / name
            loaded = load_image(path)
            # s5 keeps a stale hash: its signature no longer matches, so the file is hashed again
            signature = file_signature(path) if name != "s5.png" else "0:0"
            for step, texts in (("caption", captions), ("tags", tags)):
                failed = step == "caption" and name not in texts
                results.append(Result(step, name, str(path), signature,
                                      "same-hash" if name in ("s3.png", "s4.png") else loaded.content_hash,
                                      "fp", {}, "error" if failed else "ok", None,
                                      None if failed else texts[name], "model crashed" if failed else None, [], 0.0))
        store.put_results(results)
        (folder / "s0.txt").write_text(captions["s0.png"], encoding="utf-8")  # as captionkit wrote it
        (folder / "s3.txt").write_text("a quiet lake, edited by hand", encoding="utf-8")  # differs: trainers read it
        store.put_meta("vocabulary:test", {"tags": ["1girl", "book", "horse", "lake", "no_humans", "hatsune_miku"],
                                           "categories": [0, 0, 0, 0, 0, 4], "default_thresholds": {}})


def test_store_is_read_without_changing_anything(tmp_path):
    folder = tmp_path / "stored"
    _store_data_set(folder)
    before = _tree(folder)
    report = inspect_dataset(folder, trigger="ohwx", resolution=256, min_bucket=128, max_bucket=512,
                             near_duplicates=False, min_count=1)
    assert _tree(folder) == before
    assert sorted(p.name for p in (folder / ".captionkit").iterdir()) == ["store.sqlite"]  # no -wal/-shm left
    assert report.stats["captions"]["sources"] == {"store": 4, "file": 1}
    assert {f.file for f in report.by_kind("trigger_missing")} == {"s1.png", "s3.png"}  # s3: edited, no trigger
    assert any("1 sidecar files differ from the store" in note for note in report.notes)
    assert {f.file for f in report.by_kind("caption_refusal")} == {"s1.png"}
    (missing,) = report.by_kind("caption_missing")
    assert missing.file == "s5.png" and "model crashed" in missing.message
    # the stored hashes were used (s3 and s4 share a fake one) instead of reading the files
    assert [f.files for f in report.by_kind("duplicate_image")] == [["s3.png", "s4.png"]]
    assert report.stats["tags"]["categories"] == {"general": {"tags": 5, "occurrences": 12},
                                                   "character": {"tags": 1, "occurrences": 1}}
    contradictions = {(f.file, f.details["tag"]) for f in report.by_kind("tag_caption_contradiction")}
    assert contradictions == {("s2.png", "1girl")}
    assert any("read from the store" in note for note in report.notes)


def test_tag_files_are_known_from_the_ledger_after_the_folder_moved(tmp_path):
    from captionkit.core.store import OutputRecord, Store, text_hash

    folder = tmp_path / "tagged"
    folder.mkdir()
    picture(1).save(folder / "a.png")
    (folder / "a.txt").write_text("1girl, red_hair", encoding="utf-8")  # as `captionkit tag --ext .txt` writes
    with Store(folder) as store:
        store.put_outputs([OutputRecord(str(folder / "a.txt"), "tags", "a.png", False, None,
                                        text_hash("1girl, red_hair"), text_hash("1girl, red_hair"))])
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    report = inspect_dataset(moved, resolution=256, min_bucket=128, max_bucket=512, near_duplicates=False)
    assert report.counts["tagged"] == 1 and report.stats["tags"]["frequency"] == {"1girl": 1, "red_hair": 1}
    assert {finding.file for finding in report.by_kind("caption_missing")} == {"a.png"}  # tags, not a caption


def test_manifest_captions(tmp_path):
    folder = tmp_path / "manifest"
    folder.mkdir()
    rows = []
    for index in range(4):
        picture(300 + index).save(folder / f"m{index}.png")
        rows.append({"image": f"m{index}.png", "caption": f"ohwx, a picture of a garden number {index}",
                     "tags": ["1girl", "garden"]})
    rows[2]["caption"] = "As an AI language model, I cannot describe images."
    (folder / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    report = inspect_dataset(folder / "data.jsonl", resolution=256, min_bucket=128, max_bucket=512,
                             near_duplicates=False)
    assert report.source == "manifest"
    assert report.stats["captions"]["sources"] == {"manifest": 4}
    assert {f.file for f in report.by_kind("caption_refusal")} == {"m2.png"}
    assert report.counts["tagged"] == 4


def _run(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return run_cli("inspect", *arguments, env=env, cwd=cwd)  # in this process: about the report and exit codes


def test_cli_fail_on_exit_codes(planted, tmp_path):
    failing = _run(str(planted), *SMALL_CLI, "--no-near-duplicates", "--json", "out.json", "--report",
                   "out.html", "--fail-on", "caption_refusal,image_tiny", cwd=tmp_path)
    assert failing.returncode == 1, failing.stderr
    assert "failing (--fail-on): 2 findings of caption_refusal, image_tiny" in failing.stderr
    assert json.loads((tmp_path / "out.json").read_text())["summary"]["caption_refusal"] == 1
    assert (tmp_path / "out.html").stat().st_size > 10_000
    clean = tmp_path / "clean"
    write_clean(clean)
    passing = _run(str(clean), *SMALL_CLI, "--fail-on", "any", cwd=tmp_path)
    assert passing.returncode == 0, passing.stderr
    assert "0 findings" in passing.stderr
    typo = _run(str(clean), "--fail-on", "caption_refusl", cwd=tmp_path)
    assert typo.returncode == 2 and "Did you mean 'caption_refusal'" in typo.stderr


def test_fail_on_severities():
    assert resolve_fail_on(["error"]) == {name for name, kind in KINDS.items() if kind.severity == "error"}
    assert resolve_fail_on(["warning"]) == {name for name, kind in KINDS.items() if kind.severity != "info"}
    assert resolve_fail_on(["any"]) == set(KINDS)
    assert resolve_fail_on(["rare_tag, file_bom"]) == {"rare_tag", "file_bom"}
    with pytest.raises(ValueError, match="not a finding kind"):
        resolve_fail_on(["nonsense"])


def test_buckets_match_kohya():
    buckets = make_bucket_resolutions(1024, 256, 2048, 64)
    assert {(1024, 1024), (832, 1216), (1216, 832), (2048, 512), (512, 2048), (896, 1152)} <= set(buckets)
    assert all(width * height <= 1024 * 1024 and width % 64 == 0 and height % 64 == 0 for width, height in buckets)
    fit = Buckets(1024).fit(1920, 1080)
    assert fit.bucket == (1344, 768) and round(fit.scale, 4) == round(768 / 1080, 4) and fit.crop_fraction < 0.02
    assert Buckets(1024).fit(512, 512).scale == 2.0


def test_near_duplicate_search_matches_brute_force():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=6000, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 6000,
                                                                                                dtype=np.uint64)
    for index in range(0, 300, 3):  # plant pairs 0-6 bits apart
        flips = rng.choice(64, size=index % 7, replace=False)
        mask = sum(1 << int(bit) for bit in flips)
        hashes[index + 1] = hashes[index] ^ np.uint64(mask)
    fast = near_duplicate_pairs(hashes, 6)  # 6000 > 4096: the block index, not all pairs
    expected = set()
    for i in range(len(hashes)):
        distances = np.bitwise_count(hashes[i] ^ hashes[i + 1 :])
        for offset in np.flatnonzero(distances <= 6):
            expected.add((i, i + 1 + int(offset), int(distances[offset])))
    assert set(fast) == expected and len(expected) >= 100


def test_contradiction_rules():
    assert find_contradictions({"1boy"}, "a woman in a red dress")[0].tag == "1boy"
    assert find_contradictions({"1boy"}, "a man and a woman dancing") == []
    assert find_contradictions({"1girl"}, "she smiles at the camera") == []
    assert find_contradictions({"no_humans"}, "a girl in a field")[0].caption_words == ("girl",)
    assert find_contradictions({"blonde_hair"}, "a woman with black hair")[0].caption_words == ("black hair",)
    assert find_contradictions({"blonde_hair"}, "a woman with blonde hair") == []
    assert find_contradictions({"indoors"}, "standing outside in the rain")[0].tag == "indoors"


def test_loop_prefilter_never_hides_a_loop():
    import random

    from captionkit.core.text import collapse_repetitions
    from captionkit.inspection.checks import may_loop

    rng = random.Random(0)
    vocabulary = "a b c d e f g h i j k l".split()
    for _ in range(3000):
        words = [rng.choice(vocabulary[: rng.randint(2, 12)]) for _ in range(rng.randint(0, 40))]
        if rng.random() < 0.4:
            phrase = [rng.choice(vocabulary) for _ in range(rng.randint(1, 13))]
            at = rng.randint(0, len(words))
            words[at:at] = phrase * rng.randint(2, 5)
        text = " ".join(words)
        assert may_loop(text) or collapse_repetitions(text) == text, text
