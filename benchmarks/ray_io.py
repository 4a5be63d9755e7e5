"""What ``--executor ray`` adds around the model: listing on Ray, and prepared pixels packed to uint8.

Two measurements, each against the plain reference in the same run:

1. Listing a folder tree (``--files`` empty ``.jpg`` files in ``--folders`` folders, two levels
   deep) and reading every file's signature: the local source on the driver (``list(source)``
   plus one ``stat`` per file, as the local executor does) against Ray tasks over subtrees
   (:func:`captionkit.executors.ray_sources.list_records`). Both must give the same records.
2. Moving one prepared Florence-2 image (a 768² float32 tensor from the HF image processor):
   pickled as it is, against :func:`captionkit.executors.transport.pack` (analyse, then pickle)
   and ``unpack`` on the other side. Prints bytes, milliseconds per image and the ratio, and
   checks that the unpacked bits are the same.

    .venv/bin/python benchmarks/ray_io.py [--files 20000 --folders 200 --images 16]
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np


def make_tree(root: Path, files: int, folders: int) -> None:
    per_folder = max(1, files // folders)
    for index in range(folders):
        folder = root / f"part{index // 20:03d}" / f"shard{index:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(per_folder):
            (folder / f"{number:06d}.jpg").touch()


def listing(root: Path, cpus: int) -> None:
    import ray

    from captionkit.core.records import open_source
    from captionkit.core.store import file_signature
    from captionkit.executors.ray_sources import list_records

    started = time.perf_counter()
    local = list(open_source(root))
    local_signatures = {str(record.path): file_signature(record.path) for record in local}
    local_s = time.perf_counter() - started
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        list_records(open_source(root), ray)  # warm: worker processes started
        started = time.perf_counter()
        remote, signatures = list_records(open_source(root), ray)
        ray_s = time.perf_counter() - started
    finally:
        ray.shutdown()
    assert remote == local and signatures == local_signatures, "Ray listed other records"
    print(f"listing {len(local)} files: local {local_s:.2f} s ({len(local) / local_s:,.0f}/s), "
          f"ray tasks on {cpus} CPUs {ray_s:.2f} s ({len(local) / ray_s:,.0f}/s); ratio ray/local "
          f"{local_s / ray_s:.2f}x")


def packing(count: int) -> None:
    from PIL import Image

    from captionkit._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    from transformers import AutoProcessor

    from captionkit.executors.transport import pack, unpack
    from captionkit.testing import build_tiny_florence2

    with tempfile.TemporaryDirectory() as folder:
        processor = AutoProcessor.from_pretrained(build_tiny_florence2(Path(folder) / "model", image_size=768))
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 1024, dtype=np.float32)
    tensors = []
    for _ in range(count):  # photo-like: smooth gradients plus noise, 1024² into the 768² input
        base = np.stack([np.add.outer(ramp * rng.random(), ramp * rng.random()) / 2 for _ in range(3)], axis=-1)
        noisy = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        tensors.append(processor.image_processor(images=[Image.fromarray(noisy)], return_tensors="pt")
                       ["pixel_values"][0])
    started = time.perf_counter()
    plain = [pickle.dumps(tensor) for tensor in tensors]
    dumps_s = (time.perf_counter() - started) / count
    started = time.perf_counter()
    restored_plain = [pickle.loads(blob) for blob in plain]
    loads_s = (time.perf_counter() - started) / count
    started = time.perf_counter()
    packed = [pickle.dumps(pack(tensor)) for tensor in tensors]
    pack_s = (time.perf_counter() - started) / count
    started = time.perf_counter()
    restored = [unpack(pickle.loads(blob)) for blob in packed]
    unpack_s = (time.perf_counter() - started) / count
    assert all(a.numpy().tobytes() == b.numpy().tobytes() for a, b in zip(restored, tensors, strict=True))
    assert all(a.numpy().tobytes() == b.numpy().tobytes() for a, b in zip(restored_plain, tensors, strict=True))
    plain_mb, packed_mb = np.mean([len(b) for b in plain]) / 1e6, np.mean([len(b) for b in packed]) / 1e6
    print(f"one prepared 768² Florence-2 image: float32 {plain_mb:.2f} MB (CPU stage: pickle {dumps_s * 1e3:.1f} "
          f"ms; model stage: unpickle {loads_s * 1e3:.1f} ms), packed {packed_mb:.2f} MB (CPU stage: pack + pickle "
          f"{pack_s * 1e3:.1f} ms; model stage: unpickle + unpack {unpack_s * 1e3:.1f} ms); "
          f"{plain_mb / packed_mb:.2f}x smaller, same bits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--folders", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        make_tree(Path(folder), args.files, args.folders)
        listing(Path(folder), args.cpus)
    packing(args.images)


if __name__ == "__main__":
    main()
