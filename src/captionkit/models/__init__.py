"""Model backends register themselves here; callers ask the registry by name or by config.

A model is named by a hub id or a local folder; its family is read from its
``config.json`` (``model_type``), never guessed from the name.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captionkit.core.errors import CaptionkitError, ModelNotAvailableError

log = logging.getLogger(__name__)


@dataclass
class BackendInfo:
    """A registered model family."""

    name: str
    kind: str  # "captioner" or "tagger"
    description: str
    factory: Callable[..., Any]
    model_types: tuple[str, ...] = ()
    default_model: str | None = None
    extras: tuple[str, ...] = field(default_factory=tuple)  # captionkit extras it needs beyond the base install
    modules: tuple[str, ...] = field(default_factory=tuple)  # importable modules that show the extras are installed
    style: str = "chat"  # how build_captioner constructs it: "florence", "chat" or "tagger"

    def installed(self) -> bool:
        """True when every module this backend imports at load time is importable."""
        import importlib.util

        return all(importlib.util.find_spec(module) is not None for module in self.modules)


_REGISTRY: dict[str, BackendInfo] = {}
_HELPER_MODULES = {"base", "chat_vlm", "taggers"}  # shared code, no backends of their own


def register_backend(
    name: str,
    kind: str,
    description: str,
    model_types: tuple[str, ...] = (),
    default_model: str | None = None,
    extras: tuple[str, ...] = (),
    modules: tuple[str, ...] = (),
    style: str = "chat",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class decorator: make a backend findable by name and by config ``model_type``."""

    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[name] = BackendInfo(name, kind, description, factory, model_types, default_model, extras,
                                      modules, style)
        if isinstance(factory, type):
            factory.backend_name = name  # fingerprints name the backend, so stored results can be re-rendered
        return factory

    return wrap


def _load_builtins() -> None:
    """Import every module of this package: each family file registers itself (no list kept by hand)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name not in _HELPER_MODULES:
            importlib.import_module(f"{__name__}.{module.name}")


def list_backends() -> list[BackendInfo]:
    """Every registered backend, sorted by kind and name."""
    _load_builtins()
    return sorted(_REGISTRY.values(), key=lambda info: (info.kind, info.name))


def get_backend(name: str) -> BackendInfo:
    _load_builtins()
    if name not in _REGISTRY:
        raise CaptionkitError(f"no backend named '{name}'; known: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def backend_for_model_type(model_type: str, kind: str) -> BackendInfo:
    """The backend whose families include ``model_type``."""
    _load_builtins()
    for info in _REGISTRY.values():
        if info.kind == kind and model_type in info.model_types:
            return info
    known = sorted(t for info in _REGISTRY.values() if info.kind == kind for t in info.model_types)
    raise CaptionkitError(
        f"model type '{model_type}' is not supported for {kind}s; supported: {', '.join(known)}."
    )


def is_local(name_or_path: str | Path) -> bool:
    return Path(name_or_path).expanduser().exists()


def read_model_config(name_or_path: str, cache_dir: str | Path | None = None, revision: str | None = None) -> dict:
    """``config.json`` of a local folder or hub repo, or a plain error when it cannot be had."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelNotAvailableError(
                f"{path}: no config.json in this folder; point --model at a saved model folder."
            )
        return json.loads(config_file.read_text(encoding="utf-8"))
    text = str(name_or_path)
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or "\\" in text:
        raise ModelNotAvailableError(f"{name_or_path}: no such model folder. Check the path.")
    config_file = fetch_hub_file(name_or_path, "config.json", cache_dir=cache_dir, revision=revision)
    return json.loads(Path(config_file).read_text(encoding="utf-8"))


def fetch_hub_file(
    repo_id: str, filename: str, cache_dir: str | Path | None = None, revision: str | None = None
) -> str:
    """Download (or find in the cache) one file of a hub repo, with a one-sentence error offline."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, cache_dir=cache_dir, revision=revision, local_files_only=True)
    except Exception:  # not cached: go online below
        pass
    if not hub_reachable():
        raise ModelNotAvailableError(
            f"Model '{repo_id}' is not in the local cache and the Hugging Face Hub cannot be reached "
            "from this machine; download it where you have internet and pass --model LOCAL_FOLDER."
        )
    try:
        return hf_hub_download(repo_id, filename, cache_dir=cache_dir, revision=revision)
    except Exception as error:  # hub errors vary: 404, auth, rate limits
        raise model_unavailable(repo_id, error) from error


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection test, so an offline machine gets an answer in seconds, not after retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def model_unavailable(repo_id: str, error: BaseException) -> ModelNotAvailableError:
    """The one plain sentence users get when a hub model cannot be had."""
    name = type(error).__name__
    if "LocalEntryNotFound" in name or "Connection" in name or "Timeout" in name:
        reason = "the Hugging Face Hub cannot be reached from this machine and it is not in the local cache"
    elif "NotFound" in name or "404" in str(error):
        reason = "the hub says it does not exist (check the spelling)"
    elif "Gated" in name or "401" in str(error) or "403" in str(error):
        reason = "the hub refused access (log in with `hf auth login` or accept its licence)"
    else:
        reason = "the Hugging Face Hub cannot be reached from this machine and it is not in the local cache"
    return ModelNotAvailableError(
        f"Model '{repo_id}' is not available: {reason}; download it where you have internet "
        "and pass --model LOCAL_FOLDER."
    )


def stored_texts(settings: dict[str, Any] | None, raw: Any) -> list[str]:
    """Candidate texts of a stored caption result, rendered by the backend that made it (no model loaded)."""
    from captionkit.models.base import render_chat_texts

    name = (settings or {}).get("backend")
    _load_builtins()
    info = _REGISTRY.get(str(name))
    renderer = getattr(info.factory, "render_texts", None) if info is not None else None
    if renderer is None:
        return render_chat_texts(raw)
    return renderer(raw)


def release(holder: Any, *names: str) -> None:
    """Drop ``holder``'s attributes ``names`` (set to None) and free what they held (see free_accelerator_memory).

    Why: a full ``gc.collect()`` walks every object of the process, 0.2-0.4 s with torch and transformers
    imported, and unload ran one on every step of a pipeline, also for a step that loaded nothing (a
    resumed run). Reference counting alone frees a model that no reference cycle holds, so the collection
    runs only when something dropped here is still alive afterwards (or cannot be watched)."""
    import weakref

    watched: list[Callable[[], Any]] = []
    for name in names:
        value = getattr(holder, name, None)
        setattr(holder, name, None)
        if value is not None:
            try:
                watched.append(weakref.ref(value))
            except TypeError:  # not weakly referenceable: it cannot be told dead, so collect
                watched.append(lambda: True)
        del value
    free_accelerator_memory(collect=any(alive() is not None for alive in watched))


def free_accelerator_memory(collect: bool = True) -> None:
    """Collect garbage (unless ``collect`` is False: nothing dropped is left for it), give freed heap memory
    back to the system and cached GPU memory to the driver (after unload or out-of-memory).

    glibc keeps freed blocks in its heap (its mmap threshold grows after large frees, so a model's
    tensors often come from the heap): without ``malloc_trim`` the next model of a pipeline is loaded
    beside the dead one's pages, and the process peaks at both. Only when torch is already imported:
    a backend that never loaded it has nothing on a GPU to free.
    """
    import gc
    import sys

    if collect:
        gc.collect()
    _trim_heap()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _trim_heap() -> None:
    """``malloc_trim(0)`` where the C library is glibc (Linux); elsewhere nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs ``ldconfig``); None without it."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return None
