"""Where an image's bytes come from: a local path or an object-store URL (s3://, gs://, az://, hf://, file://).

One module so every reader (sources, decode, export, inspect, Ray) fetches the same way: through fsspec,
with retries on transient failures (5xx, throttling, timeouts) and one clear error for a missing object
(404) or a refused one (403). Credentials come from the ordinary places (environment variables,
profiles, instance metadata) plus ``storage_options`` given by the caller (``--storage-options JSON``);
they live only in this process's memory: never in records, the store, logs, sidecars or exports.

How a record refers to a remote image: ``Record.path`` stays a local :class:`~pathlib.Path` (or None
for text-only rows) and ``Record.url`` holds the URL string (``s3://bucket/key.jpg``); ``Record.location``
is whichever is set, as a string. ``file://`` URLs are turned into local paths up front
(:func:`local_path`), so only real remote objects carry a ``url``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captionkit.core.errors import CaptionkitError

#: URL schemes read through fsspec (the package each needs is an optional extra of captionkit).
REMOTE_SCHEMES: dict[str, str] = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs",
    "hf": "huggingface_hub", "http": "aiohttp", "https": "aiohttp", "memory": "fsspec",
}
_EXTRAS = {"s3fs": "s3", "gcsfs": "gcs", "adlfs": "azure", "huggingface_hub": "hf", "aiohttp": "http"}
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")

RETRIES = 4  # attempts after the first, on 5xx / throttling / timeouts / dropped connections
_BACKOFF_S = 0.25

_defaults_lock = threading.Lock()
_default_storage_options: dict[str, Any] = {}


class RemoteError(CaptionkitError):
    """An object store refused, lacked or kept failing a request; the message names the URL, the cause, the fix."""


def scheme(text: str | Path) -> str | None:
    """The URL scheme of ``text`` (lower case), or None for a plain path (``C:\\x`` included)."""
    match = _URL.match(str(text))
    return match.group(1).lower() if match else None


def is_url(text: str | Path | None) -> bool:
    """True for an object-store URL read through fsspec (``file://`` is not: it is a local path)."""
    if text is None or isinstance(text, Path):
        return False
    name = scheme(text)
    return name is not None and name != "file"


def local_path(text: str | Path) -> Path:
    """``file:///x/y`` → ``/x/y``; any other path unchanged (``~`` expanded)."""
    value = str(text)
    if scheme(value) == "file":
        from urllib.parse import unquote, urlparse

        parsed = urlparse(value)
        return Path(unquote((parsed.netloc and f"//{parsed.netloc}") + parsed.path) or "/")
    return Path(value).expanduser()


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` JSON → dict (the fsspec filesystem's keyword arguments); one clear error otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise CaptionkitError(f"--storage-options: not valid JSON ({error.msg}). Pass an object, e.g. "
                              " '{\"anon\": true}' or '{\"client_kwargs\": {\"endpoint_url\": \"...\"}}'.") from error
    if not isinstance(value, dict):
        raise CaptionkitError("--storage-options: expected a JSON object of filesystem options, "
                              "e.g. '{\"anon\": true}'.")
    return value


def set_default_storage_options(options: dict[str, Any] | None) -> None:
    """Options used when a call passes none (what the CLI's ``--storage-options`` sets for the whole run)."""
    global _default_storage_options
    with _defaults_lock:
        _default_storage_options = dict(options or {})


@contextmanager
def storage_options_set(options: dict[str, Any] | str | None) -> Iterator[None]:
    """The run's options (a dict or ``--storage-options`` JSON) as the default while the block runs."""
    previous = default_storage_options()
    set_default_storage_options(parse_storage_options(options) if isinstance(options, str) else options)
    try:
        yield
    finally:
        set_default_storage_options(previous)


def default_storage_options() -> dict[str, Any]:
    with _defaults_lock:
        return dict(_default_storage_options)


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``; a missing extra is one clear error naming it."""
    import fsspec

    options = default_storage_options() if storage_options is None else storage_options
    name = scheme(url) or "file"
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as error:
        package = REMOTE_SCHEMES.get(name, name)
        extra = _EXTRAS.get(package, name)
        raise RemoteError(f"{url}: reading {name}:// needs the {package} package. "
                          f"Install it: pip install 'captionkit[{extra}]'.") from error
    except ValueError as error:
        raise RemoteError(f"{url}: {name}:// is not a storage protocol fsspec knows ({error}).") from error


def _status_of(error: BaseException) -> int | None:
    """HTTP status carried by an fsspec/botocore/aiohttp error, when there is one."""
    for item in (error, error.__cause__, error.__context__):
        if item is None:
            continue
        for attribute in ("status", "status_code", "code"):
            value = getattr(item, attribute, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
        response = getattr(item, "response", None)
        if isinstance(response, dict):
            value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(value, int):
                return value
    return None


def classify(url: str, error: BaseException) -> RemoteError | None:
    """A permanent failure as its one clear error (404, 403, 400-class); None when worth retrying."""
    status = _status_of(error)
    # fsspec's http:// filesystem reports any failed HEAD/GET as FileNotFoundError: a 5xx behind it is transient
    if status == 404 or (isinstance(error, FileNotFoundError) and (status is None or status < 500)):
        return RemoteError(f"{url}: no such object (404). Check the bucket and key, or the manifest row naming it.")
    if isinstance(error, PermissionError) or status in (401, 403):
        return RemoteError(f"{url}: access denied (403). Check the credentials (environment, profile or "
                           "--storage-options) and the bucket policy: they must allow reading this object.")
    if type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        return RemoteError(redact(f"{url}: no credentials found ({error}). Set them the usual way (environment "
                           "variables, a profile, an instance role) or pass --storage-options."))
    if isinstance(error, (IsADirectoryError, NotADirectoryError)):
        return RemoteError(f"{url}: is a prefix (folder), not an object.")
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return RemoteError(redact(f"{url}: the object store refused the request ({status}: {error})."))
    return None


def with_retries(url: str, action: Any, retries: int = RETRIES) -> Any:
    """``action()`` retried with backoff on transient failures; a permanent one raises its :class:`RemoteError`."""
    for attempt in range(retries + 1):
        try:
            return action()
        except RemoteError:
            raise
        except Exception as error:  # fsspec backends raise OSError, ClientError, aiohttp and timeout errors
            permanent = classify(url, error)
            if permanent is not None:
                raise permanent from error
            if attempt == retries:
                raise RemoteError(redact(f"{url}: still failing after {retries + 1} attempts ({type(error).__name__}: "
                                         f"{error}). Check the endpoint and network; the next run tries again.")
                                  ) from error
            time.sleep(_BACKOFF_S * (2 ** attempt))
    raise AssertionError("unreachable")


def read_bytes(location: str | Path, storage_options: dict[str, Any] | None = None,
               retries: int = RETRIES) -> bytes:
    """The whole object (or local file) at ``location``; remote reads retried, 403/404 one clear error."""
    if not is_url(location):
        return local_path(location).read_bytes()
    url = str(location)
    fs, path = filesystem(url, storage_options)
    return with_retries(url, lambda: fs.cat_file(path), retries)


def as_image_error(url: str, error: RemoteError) -> Any:
    """A failed fetch as the record's :class:`~captionkit.core.errors.ImageLoadError` (the run goes on)."""
    from captionkit.core.errors import ImageLoadError

    cause, _, fix = str(error).removeprefix(f"{url}: ").partition(". ")
    return ImageLoadError(url, cause, fix or "Check the URL.")


def fetch_all(urls: list[str], workers: int, storage_options: dict[str, Any] | None = None
              ) -> dict[str, bytes | RemoteError]:
    """Every URL's bytes, ``workers`` requests at a time; a failure is that URL's :class:`RemoteError`."""
    from concurrent.futures import ThreadPoolExecutor

    def one(url: str) -> bytes | RemoteError:
        try:
            return read_bytes(url, storage_options)
        except RemoteError as error:
            return error

    if not urls:
        return {}
    with ThreadPoolExecutor(max(1, min(workers, len(urls))), thread_name_prefix="captionkit-fetch") as pool:
        return dict(zip(urls, pool.map(one, urls), strict=True))


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write one object (object stores put whole objects: no partial file is ever visible)."""
    fs, path = filesystem(url, storage_options)
    with_retries(url, lambda: fs.pipe_file(path, data))


def upload_tree(folder: Path, url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Copy every file under the local ``folder`` to the prefix ``url`` (same relative keys); returns the count.

    Only files whose bytes differ from the object already there are sent (sizes compared first).
    """
    fs, prefix = filesystem(url, storage_options)
    count = 0
    for file in sorted(folder.rglob("*")):
        if not file.is_file():
            continue
        key = prefix.rstrip("/") + "/" + file.relative_to(folder).as_posix()
        data = file.read_bytes()
        target = f"{scheme(url)}://{key}"
        try:
            existing = fs.info(key)
        except (FileNotFoundError, OSError):
            existing = None
        if existing is not None and existing.get("size") == len(data) and fs.cat_file(key) == data:
            continue
        with_retries(target, lambda key=key, data=data: fs.pipe_file(key, data))
        count += 1
    return count


@dataclass(frozen=True)
class RemoteObject:
    """One listed object: its URL and the signature that says whether it changed (ETag, size, mtime)."""

    url: str
    signature: str


def object_signature(info: dict[str, Any]) -> str:
    """What the store compares to decide that an object changed: ETag (or checksum), size, modification time."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("blob_id") or ""
    modified = info.get("LastModified") or info.get("last_modified") or info.get("updated") or info.get("mtime")
    if hasattr(modified, "timestamp"):  # whole seconds: a listing gives milliseconds, a HEAD's header does not
        modified = int(modified.timestamp())
    size = info.get("size", info.get("Size"))
    return f"etag:{str(etag or '').strip(chr(34))}:{size}:{modified or ''}"


def signature(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """``url``'s :func:`object_signature` from one metadata request (a HEAD on S3)."""
    fs, path = filesystem(url, storage_options)
    return object_signature(with_retries(url, lambda: fs.info(path)))


LIST_PAGE = 1000  # keys per S3 LIST request


def signatures(urls: list[str], workers: int = 16, storage_options: dict[str, Any] | None = None
               ) -> dict[str, str | None]:
    """Each URL's :func:`object_signature` (None: no such object); a refused request (403) raises.

    Objects named one by one (a manifest's rows, shards) mostly share a few prefixes: on S3 each prefix
    holding several of them is read with LIST requests (1000 keys each, ETags included) from the first
    wanted key on, instead of one HEAD per object. A listing stops once it has cost as many requests as
    the HEADs it still saves; what it did not find gets a HEAD (``workers`` at a time).
    """
    from concurrent.futures import ThreadPoolExecutor

    found: dict[str, str | None] = {}
    by_prefix: dict[str, list[str]] = {}
    for url in dict.fromkeys(urls):
        if scheme(url) in ("s3", "s3a"):
            by_prefix.setdefault(parent(url), []).append(url)
    listed = [(prefix, wanted) for prefix, wanted in by_prefix.items() if len(wanted) > 1]
    if listed:
        with ThreadPoolExecutor(max(1, min(workers, len(listed))), thread_name_prefix="captionkit-list") as pool:
            for result in pool.map(lambda item: _list_signatures(*item, storage_options), listed):
                found.update(result)

    def head(url: str) -> str | None:
        try:
            return signature(url, storage_options)
        except RemoteError as error:
            if "(404)" in str(error):
                return None
            raise

    rest = [url for url in dict.fromkeys(urls) if url not in found]
    if rest:
        with ThreadPoolExecutor(max(1, min(workers, len(rest))), thread_name_prefix="captionkit-head") as pool:
            found.update(zip(rest, pool.map(head, rest), strict=True))
    return {url: found[url] for url in urls}


def _list_signatures(prefix: str, urls: list[str], storage_options: dict[str, Any] | None
                     ) -> dict[str, str | None]:
    """Signatures of ``urls`` (all directly under ``prefix``) from S3 LIST pages, within the request budget."""
    fs, path = filesystem(prefix, storage_options)
    bucket, _, key_prefix = path.partition("/")
    keys = {url.split("://", 1)[1].partition("/")[2]: url for url in urls}
    first, last = min(keys), max(keys)
    found: dict[str, str | None] = {}
    arguments = {"Bucket": bucket, "Prefix": key_prefix.rstrip("/") + "/" if key_prefix else "", "MaxKeys": LIST_PAGE}
    if first[:-1]:
        arguments["StartAfter"] = first[:-1]  # the key just before the first wanted one, or before it
    pages = 0
    while pages < len(keys) - len(found):  # a page costs what one HEAD costs
        page = with_retries(prefix, lambda: fs.call_s3("list_objects_v2", **arguments))
        pages += 1
        for item in page.get("Contents", []):
            if item["Key"] in keys:
                found[keys[item["Key"]]] = object_signature(item)
        contents = page.get("Contents") or [{}]
        if not page.get("IsTruncated") or contents[-1].get("Key", last) >= last or len(found) == len(keys):
            for url in keys.values():  # listed through the last wanted key: the others do not exist
                found.setdefault(url, None)
            break
        arguments["ContinuationToken"] = page["NextContinuationToken"]
        arguments.pop("StartAfter", None)
    return found


def list_objects(url: str, extensions: frozenset[str], storage_options: dict[str, Any] | None = None,
                 recursive: bool = True) -> Iterator[RemoteObject]:
    """Every object under the prefix ``url`` whose extension is in ``extensions``, sorted by key."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)  # fsspec keeps listings per process: a run sees the bucket as it is now
    protocol = scheme(url) or "s3"
    found = with_retries(url, lambda: fs.find(path, maxdepth=None if recursive else 1, detail=True))
    for key in sorted(found):
        info = found[key]
        if info.get("type", "file") != "file" or Path(key).suffix.lower() not in extensions:
            continue
        if any(part.startswith(".") for part in key[len(path.rstrip("/")):].split("/")):
            continue  # hidden, as for folders
        yield RemoteObject(f"{protocol}://{key.lstrip('/')}", object_signature(info))


def kind(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """'file' (one object), 'directory' (a prefix with objects under it), or a 404 :class:`RemoteError`."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    if with_retries(url, lambda: fs.isfile(path)):
        return "file"
    if with_retries(url, lambda: fs.isdir(path)):
        return "directory"
    raise RemoteError(f"{url}: no such object or prefix (404). Check the bucket and key.")


def output_cache(output_url: str) -> Path:
    """The local folder standing in for a URL output (``--output-dir s3://...``, a pipeline's ``save_folder``).

    The store (SQLite needs a local disk) and files staged for upload live there. Keyed by the URL
    (never by options: credentials are not part of it), under ``$CAPTIONKIT_CACHE`` or
    ``~/.cache/captionkit/remote``; the same URL resumes from the same store.
    """
    import hashlib
    import os

    base = Path(os.environ.get("CAPTIONKIT_CACHE") or Path.home() / ".cache" / "captionkit").expanduser()
    key = hashlib.blake2b(output_url.rstrip("/").encode("utf-8"), digest_size=8).hexdigest()
    name = "".join(char if char.isalnum() or char in "-_." else "_" for char in output_url.split("://", 1)[-1])
    return base / "remote" / f"{name[:60]}-{key}"


def join(base: str, relative: str) -> str:
    """``base`` URL (a prefix) joined with a relative key; an absolute URL in ``relative`` wins."""
    if scheme(relative):
        return relative
    return base.rstrip("/") + "/" + relative.lstrip("/")


def parent(url: str) -> str:
    """The prefix holding ``url`` (``s3://b/x/y.jpg`` → ``s3://b/x``)."""
    return url.rstrip("/").rsplit("/", 1)[0]


def relative_key(url: str, root: str) -> str:
    """``url``'s key relative to the prefix ``root`` (the record id); the URL's key when outside it."""
    prefix = root.rstrip("/") + "/"
    if url.startswith(prefix):
        return url[len(prefix):]
    return url.split("://", 1)[1]


def redact(text: str, storage_options: dict[str, Any] | None = None) -> str:
    """``text`` with every secret-looking value of ``storage_options`` replaced by ``***``.

    For messages that quote a backend's own error text (which could echo a token or a SAS string).
    """
    options = default_storage_options() if storage_options is None else storage_options
    for value in _secret_values(options):
        text = text.replace(value, "***")
    return text


def _secret_values(options: Any) -> Iterator[str]:
    if isinstance(options, dict):
        for key, value in options.items():
            if isinstance(value, str) and len(value) >= 4 and any(
                    word in key.lower() for word in ("key", "secret", "token", "password", "credential", "sas")):
                yield value
            else:
                yield from _secret_values(value)
    elif isinstance(options, list):
        for value in options:
            yield from _secret_values(value)
