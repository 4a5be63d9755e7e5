"""Reading images from an object store: captionkit's fetch stage against a plain one-at-a-time loop.

A real S3 server (moto's, in a subprocess on 127.0.0.1, as the tests start it) holds ``--images``
JPEGs of ``--size``² pixels. Three readers fetch every object's bytes, in the same run:

1. a plain ``boto3`` loop (``get_object`` one key after the other), what a seed script does;
2. a plain ``fsspec`` loop (``fs.cat_file`` one at a time);
3. captionkit: the prefix listed by :class:`captionkit.core.records.RemoteFolderSource` (with
   ETags, so resuming needs no request per object), then the executor's fetch stage:
   :func:`captionkit.core.locations.read_bytes` (retries, 403/404 errors) on ``--io-workers`` threads.

All three must return the same bytes. Prints seconds, images/s and the ratio to the boto3 loop.
A local moto server answers in about a millisecond; a real bucket's 20-100 ms per request makes
the concurrent reader's lead larger, not smaller.

    .venv/bin/python benchmarks/remote_io.py [--images 200 --size 512 --io-workers 16]
"""

from __future__ import annotations

import argparse
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--io-workers", type=int, default=16)
    args = parser.parse_args()

    from captionkit.core import locations
    from captionkit.core.records import RemoteFolderSource
    from captionkit.testing.s3_server import moto_server

    rng = np.random.default_rng(0)
    with moto_server() as server:
        client = server.client()
        client.create_bucket(Bucket="bench")
        for index in range(args.images):
            buffer = io.BytesIO()
            pixels = rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
            client.put_object(Bucket="bench", Key=f"images/{index:05d}.jpg", Body=buffer.getvalue())
        keys = [f"images/{index:05d}.jpg" for index in range(args.images)]
        megabytes = sum(client.head_object(Bucket="bench", Key=key)["ContentLength"] for key in keys) / 1e6

        started = time.perf_counter()
        plain = [client.get_object(Bucket="bench", Key=key)["Body"].read() for key in keys]
        boto3_s = time.perf_counter() - started

        import s3fs

        fs = s3fs.S3FileSystem(**server.storage_options())
        started = time.perf_counter()
        by_fsspec = [fs.cat_file(f"bench/{key}") for key in keys]
        fsspec_s = time.perf_counter() - started

        with locations.storage_options_set(server.storage_options()):
            started = time.perf_counter()
            source = RemoteFolderSource(root="s3://bench/images", description="bench")
            urls = [record.url for record in source]
            with ThreadPoolExecutor(args.io_workers) as pool:
                fetched = list(pool.map(locations.read_bytes, urls))
            captionkit_s = time.perf_counter() - started
        assert fetched == plain == by_fsspec, "the readers disagree"
        assert len(source.signatures) == args.images

    print(f"{args.images} JPEGs of {args.size}² ({megabytes:.1f} MB) from a moto S3 server on 127.0.0.1")
    for name, seconds in (("boto3 loop, one at a time", boto3_s), ("fsspec loop, one at a time", fsspec_s),
                          (f"captionkit (list + {args.io_workers} io-workers)", captionkit_s)):
        print(f"  {name:40s} {seconds:7.2f} s  {args.images / seconds:8.1f} images/s  "
              f"x{boto3_s / seconds:.2f} vs boto3 loop")


if __name__ == "__main__":
    main()
