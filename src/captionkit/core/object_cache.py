"""A local mirror of objects from object storage, for readers that go over the same images again.

Why: training reads every image once per epoch and `inspect` reads images and the caption files
beside them; fetching from a bucket each time would cost a request per image per epoch. Objects are
fetched ``workers`` at a time (retries and the clear 403/404 errors of :mod:`captionkit.core.locations`)
into ``<cache>/objects/<scheme>/<bucket>/<key>`` (the bucket's layout, so ``a.txt`` stays beside
``a.png``), and each file's object signature (ETag, size, modification time) is kept under
``<cache>/objects/.signatures/``: an object whose signature is unchanged is not fetched again, in this
run or the next; a changed one is. The mirror holds object bytes and signatures only, never options
or credentials. ``<cache>`` is ``$CAPTIONKIT_CACHE`` or ``~/.cache/captionkit``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from captionkit.core import locations
from captionkit.core.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

SIGNATURES = ".signatures"


def cache_root() -> Path:
    """``$CAPTIONKIT_CACHE/objects`` (default ``~/.cache/captionkit/objects``)."""
    base = Path(os.environ.get("CAPTIONKIT_CACHE") or Path.home() / ".cache" / "captionkit").expanduser()
    return base / "objects"


def mirror_path(url: str, root: Path | None = None) -> Path:
    """Where ``url`` (``s3://bucket/a/b.png``) lies in the mirror: ``<root>/s3/bucket/a/b.png``."""
    scheme = locations.scheme(url) or "file"
    parts = [part for part in PurePosixPath(url.split("://", 1)[1]).parts if part not in ("", ".", "..", "/")]
    if not parts:
        raise locations.RemoteError(f"{url}: names no object.")
    return (root or cache_root()) / scheme / Path(*parts)


@dataclass
class MirrorReport:
    """What one :func:`mirror` call did: local paths by URL, failures by URL, and the counts."""

    paths: dict[str, Path] = field(default_factory=dict)
    errors: dict[str, locations.RemoteError] = field(default_factory=dict)
    fetched: int = 0
    reused: int = 0


def mirror(urls: Iterable[str], workers: int = 16, signatures: dict[str, str] | None = None,
           root: Path | None = None, missing_ok: bool = False) -> MirrorReport:
    """Each URL's local copy, fetched ``workers`` at a time unless the mirror has it with the same signature.

    ``signatures`` (URL → signature, from a listing) save the metadata request per object; without
    one a URL costs one HEAD (an unchanged object then costs nothing more). ``missing_ok``: a 404
    is no error (looking for optional caption files); the URL is just absent from ``paths``.
    """
    root = root or cache_root()
    known = signatures or {}
    report = MirrorReport()
    wanted = list(dict.fromkeys(urls))

    def one(url: str) -> tuple[str, Path | locations.RemoteError, bool]:
        try:
            target = mirror_path(url, root)
            marker = root / SIGNATURES / target.relative_to(root)
            signature = known.get(url) or locations.signature(url)
            if target.is_file() and marker.is_file() and marker.read_text(encoding="utf-8") == signature:
                return url, target, False
            atomic_write_bytes(target, locations.read_bytes(url), durable=False)
            atomic_write_text(marker, signature, durable=False)
            return url, target, True
        except locations.RemoteError as error:
            return url, error, False

    if not wanted:
        return report
    with ThreadPoolExecutor(max(1, min(workers, len(wanted))), thread_name_prefix="captionkit-mirror") as pool:
        for url, result, fetched in pool.map(one, wanted):
            if isinstance(result, Path):
                report.paths[url] = result
                report.fetched += fetched
                report.reused += not fetched
            elif not (missing_ok and "(404)" in str(result)):
                report.errors[url] = result
    log.info("object mirror: %d fetched, %d unchanged in the local cache %s", report.fetched, report.reused, root)
    return report


def as_urls(value, root: Path | None = None):  # noqa: ANN001, ANN201 - any JSON-like value, same shape back
    """``value`` with every mirror path (``<root>/s3/bucket/key``) written as its URL (``s3://bucket/key``).

    For reports made from the mirror: they must name the objects, not the cache.
    """
    base = str(root or cache_root()) + os.sep
    if isinstance(value, str):
        if base not in value:
            return value
        head, *rest = value.split(base)
        out = [head]
        for part in rest:
            scheme, _, tail = part.partition(os.sep)
            out.append(f"{scheme}://{tail.replace(os.sep, '/')}" if tail else base + part)
        return "".join(out)
    if isinstance(value, dict):
        return {key: as_urls(item, root) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_urls(item, root) for item in value)
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.replace(value, **{name: as_urls(getattr(value, name), root)
                                             for name in value.__dataclass_fields__})
    return value
