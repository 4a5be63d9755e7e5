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

WebDataset shards (``--case shards``), each against its reference in the same run:

4. ``--shards`` shards of ``--per-shard`` JPEGs in the bucket, read by a plain ``webdataset`` loop (the
   library's own tar iterator and key grouping over each shard streamed by s3fs, one shard after the
   other) and by captionkit (the pattern checked with LIST requests, shards listed on ``--io-workers``
   threads, each member read by one ranged GET on ``--io-workers`` threads, as the decode stage does).
   Same bytes; prints the ratio.
5. Signatures of ``--rows`` objects named one by one (a manifest's rows): one HEAD each on
   ``--io-workers`` threads (what a run did before) against :func:`captionkit.core.locations.signatures`
   (LIST pages); same signatures; prints the requests and the ratio.
6. Output shards: a ``--sink-samples`` shard committed in batches of 16 to a local store; the time
   spent in the sink after each commit, reading the shard's results after every batch (what it did
   before: ``write_output_shards`` per batch) against :class:`captionkit.core.webdataset.ShardSink`
   (one read when the last sample lands); both write the shard once.

    .venv/bin/python benchmarks/remote_io.py [--images 200 --size 512 --io-workers 16 --case all]
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
    parser.add_argument("--case", choices=("images", "shards", "all"), default="all")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=50)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--sink-samples", type=int, default=2000)
    args = parser.parse_args()
    if args.case in ("images", "all"):
        images(args)
    if args.case in ("shards", "all"):
        shards(args)


def _jpeg(rng, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _line(name: str, seconds: float, count: int, reference_s: float, unit: str = "images") -> str:
    return (f"  {name:52s} {seconds:7.2f} s  {count / seconds:9.1f} {unit}/s  x{reference_s / seconds:.2f} "
            "vs the reference")


def shards(args) -> None:
    """Cases 4-6: shards from the bucket, signatures of named objects, the output-shard sink's store reads."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import s3fs
    import webdataset
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from captionkit.core import locations
    from captionkit.core.webdataset import list_shard, open_shards
    from captionkit.testing.s3_server import moto_server

    rng = np.random.default_rng(1)
    with moto_server() as server, tempfile.TemporaryDirectory() as folder:
        client = server.client()
        client.create_bucket(Bucket="bench")
        written: dict[str, bytes] = {}
        with webdataset.ShardWriter(f"{folder}/shard-%05d.tar", maxcount=args.per_shard, verbose=0) as writer:
            for index in range(args.shards * args.per_shard):
                written[f"{index:09d}"] = _jpeg(rng, args.size)
                writer.write({"__key__": f"{index:09d}", "jpg": written[f"{index:09d}"], "txt": f"alt {index}"})
        for path in sorted(Path(folder).glob("shard-*.tar")):
            client.put_object(Bucket="bench", Key=f"wds/{path.name}", Body=path.read_bytes())
        megabytes = sum(len(data) for data in written.values()) / 1e6
        pattern = f"s3://bench/wds/shard-{{00000..{args.shards - 1:05d}}}.tar"
        urls = [f"bench/wds/shard-{number:05d}.tar" for number in range(args.shards)]

        fs = s3fs.S3FileSystem(**server.storage_options())
        started = time.perf_counter()
        plain: dict[str, bytes] = {}
        for url in urls:  # the webdataset library's reader, each shard streamed once, one after the other
            with fs.open(url, "rb") as stream:
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                    plain[sample["__key__"]] = sample["jpg"]
        plain_s = time.perf_counter() - started

        with locations.storage_options_set(server.storage_options()):
            started = time.perf_counter()
            source = open_shards(pattern)
            with ThreadPoolExecutor(args.io_workers) as pool:
                records = [record for listing in pool.map(list_shard, source.shards) for record in listing.records]
                fetched = dict(zip([record.path.key for record in records],
                                   pool.map(lambda record: record.path.read_bytes(), records), strict=True))
            captionkit_s = time.perf_counter() - started
        assert plain == fetched == written, "the readers disagree"
        count = len(written)
        print(f"{count} JPEGs of {args.size}² ({megabytes:.1f} MB) in {args.shards} shards on a moto S3 server")
        print(_line("plain webdataset loop (reference)", plain_s, count, plain_s))
        print(_line(f"captionkit (list + ranged reads, {args.io_workers} io-workers)", captionkit_s, count, plain_s))

        for index in range(args.rows):
            client.put_object(Bucket="bench", Key=f"rows/{index:06d}.jpg", Body=b"x" * (index % 97 + 1))
        rows = [f"s3://bench/rows/{index:06d}.jpg" for index in range(args.rows)]
        options = server.storage_options()
        counting = locations.filesystem(rows[0], options)[0]
        counting.connect()
        requests: list[str] = []
        counting.s3.meta.events.register("before-call.s3", lambda model, **_: requests.append(model.name))
        counting.invalidate_cache()
        started = time.perf_counter()
        with ThreadPoolExecutor(args.io_workers) as pool:
            heads = dict(zip(rows, pool.map(lambda url: locations.signature(url, options), rows), strict=True))
        head_s, head_requests = time.perf_counter() - started, len(requests)
        requests.clear()
        started = time.perf_counter()
        listed = locations.signatures(rows, args.io_workers, options)
        list_s, list_requests = time.perf_counter() - started, len(requests)
        assert listed == heads, "the signatures disagree"
        print(f"signatures of {args.rows} objects named one by one (a manifest's rows)")
        print(_line(f"one HEAD each, {args.io_workers} at a time ({head_requests} requests; reference)", head_s,
                    args.rows, head_s, "objects"))
        print(_line(f"captionkit LIST pages ({list_requests} requests)", list_s, args.rows, head_s, "objects"))
        sink(args.sink_samples, Path(folder))


def sink(samples: int, folder) -> None:
    """Case 6: store reads of the output-shard sink, per batch (before) against once per shard (now)."""
    import webdataset

    from captionkit.core.records import open_source
    from captionkit.core.store import Result, Store
    from captionkit.core.webdataset import ShardSink, write_output_shards

    with webdataset.ShardWriter(str(folder / "one-%05d.tar"), maxcount=samples, verbose=0) as writer:
        for index in range(samples):
            writer.write({"__key__": f"{index:09d}", "jpg": b"\xff\xd8" + bytes(200), "txt": "x"})
    records = list(open_source(folder / "one-00000.tar"))
    timings = {}
    for name in ("per batch (before)", "ShardSink (now)"):
        output = folder / name.split()[0]
        with Store(output) as store:
            shard_sink = ShardSink(store, output)
            shard_sink.plan(records)
            timings[name] = 0.0
            for start in range(0, samples, 16):
                batch = records[start:start + 16]
                store.put_results([Result("caption", record.id, str(record.path), None, None, "f", None, "ok", "x",
                                          f"caption {record.id}", None, [], 0.0) for record in batch])
                texts = {record.id: f"caption {record.id}" for record in batch}
                started = time.perf_counter()  # the sink's own time (the store commit is the same in both)
                if name.startswith("per"):
                    write_output_shards(store, records, output)
                else:
                    shard_sink.write(texts)
                timings[name] += time.perf_counter() - started
    reference = timings["per batch (before)"]
    print(f"one output shard of {samples} samples committed in batches of 16: time in the sink after each batch "
          "(its store reads, then writing the shard once)")
    for name, seconds in timings.items():
        print(_line(name, seconds, samples, reference, "samples"))


def images(args) -> None:
    """Cases 1-3: images under a prefix."""
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
