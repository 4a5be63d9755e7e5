"""The web UI's Review tab on a large folder: open, first page (thumbnails made), the same page again
(cached), a far page, and the filters, timed on generated images with caption files.

What must hold on 50,000 images: opening lists names only (no decode, no caption read), a page
decodes only its own images once, and a search reads each caption file once per change.

    python -m captionkit.ui.benchmark --images 50000
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def make_folder(folder: Path, count: int, side: int) -> None:
    """JPEGs of ``side``² pixels (one file written and copied: generating is not what is measured);
    every other one has a caption file."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    seed = folder / "seed.jpg"
    Image.new("RGB", (side, side), (120, 80, 40)).save(seed, quality=85)
    data = seed.read_bytes()
    seed.unlink()

    def write(index: int) -> None:
        (folder / f"{index // 1000:03d}").mkdir(exist_ok=True)
        path = folder / f"{index // 1000:03d}" / f"photo{index:06d}.jpg"
        path.write_bytes(data)
        if index % 2 == 0:
            path.with_suffix(".txt").write_text(f"a photo number {index}, brown, square" +
                                                (", sunset" if index % 100 == 0 else ""))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(count)))


def timed(label: str, results: dict, function):
    started = time.perf_counter()
    value = function()
    results[label] = round(time.perf_counter() - started, 3)
    print(f"{label:36} {results[label]:8.3f} s")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--side", type=int, default=512, help="image side in pixels")
    parser.add_argument("--page-size", type=int, default=48)
    parser.add_argument("--folder", type=Path, default=None, help="reuse this folder (default: a temp folder)")
    parser.add_argument("--output", type=Path, default=Path("bench-out/ui_review.json"))
    args = parser.parse_args()

    from captionkit.ui.dataset import Dataset

    scratch = None
    folder = args.folder
    if folder is None:
        scratch = Path(tempfile.mkdtemp(prefix="captionkit-ui-bench-"))
        folder = scratch / "photos"
    results: dict = {"images": args.images, "side": args.side, "page_size": args.page_size}
    try:
        if not folder.exists():
            timed("generate folder (not part of the UI)", results, lambda: make_folder(folder, args.images, args.side))
        dataset = timed("open (list names)", results, lambda: Dataset(folder))
        assert len(dataset.ids) == args.images
        size = args.page_size
        timed("page 1 (thumbnails made)", results, lambda: dataset.page(dataset.ids, 1, size))
        timed("page 1 again (cached)", results, lambda: dataset.page(dataset.ids, 1, size))
        last = (len(dataset.ids) + size - 1) // size
        timed(f"page {last} (thumbnails made)", results, lambda: dataset.page(dataset.ids, last, size))
        found = timed("search text (first: reads captions)", results, lambda: dataset.filter(text="sunset"))
        timed("search text again (cached texts)", results, lambda: dataset.filter(text="sunset"))
        empty = timed("filter empty captions", results, lambda: dataset.filter(empty_only=True))
        timed("filter by tag", results, lambda: dataset.filter(tag="brown"))
        first_id = dataset.ids[0]
        timed("save one caption (atomic + ledger)", results, lambda: dataset.save_caption(first_id, "edited"))
        timed("undo it", results, dataset.undo)
        results["found_sunset"] = len(found)
        results["empty"] = len(empty)
        thumbnails = list(dataset.thumbnail_root.rglob("*.jpg"))
        results["thumbnails_made"] = len(thumbnails)
        print(f"thumbnails on disk: {len(thumbnails)} (two pages); {len(found)} found; {len(empty)} empty")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
