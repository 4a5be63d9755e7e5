"""The one place that makes a CUDA-only torchvision importable next to a CPU-only torch.

Why: some package indexes (this project's CI among them) offer torch as a CPU wheel but
torchvision only as a CUDA build. Importing that torchvision fails with
``RuntimeError: operator torchvision::nms does not exist`` because its compiled
operators do not load, and that failure also breaks timm, open_clip and the
torchvision-backed image processors of transformers, which only need torchvision's
pure-Python transforms. When, and only when, that exact failure happens, we declare the
schemas of the two operators torchvision registers fake kernels for, then import again.
The compiled operators (nms, roi_align, ...) stay unavailable and raise if called;
captionkit never calls them. On a machine where torchvision imports normally (a
matching CUDA or CPU pair) this module does nothing.

Every import path is covered: ``import captionkit`` installs a meta-path hook, so the
first ``import torchvision`` in the process, whoever makes it (timm, open_clip,
transformers, user code), goes through the repair.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from types import ModuleType

_log = logging.getLogger(__name__)
_lock = threading.RLock()
_done = False

_MISSING_OPERATOR_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _import_repairing() -> ModuleType | None:
    """Import torchvision for real (the hook stepping aside); None when it is not installed."""
    global _done
    with _lock:
        if "torchvision" in sys.modules and _done:
            return sys.modules["torchvision"]
        _done = True
        _HOOK.active = False
        try:
            try:
                import torchvision
                return torchvision
            except ImportError:
                return None  # not installed: callers that need it report their own install hint
            except RuntimeError as error:
                if "torchvision::" not in str(error) or "does not exist" not in str(error):
                    raise
            for name in [module for module in sys.modules if module.split(".")[0] == "torchvision"]:
                del sys.modules[name]
            import torch

            library = torch.library.Library("torchvision", "FRAGMENT")
            for schema in _MISSING_OPERATOR_SCHEMAS:
                try:
                    library.define(schema)
                except RuntimeError:
                    pass  # already defined (an earlier partial import got that far)
            # Keep the library object alive for the whole process: dropping it removes the schemas.
            globals()["_library"] = library
            import torchvision  # noqa: F811

            _log.info(
                "torchvision's compiled operators do not match this torch build (CPU torch with a CUDA "
                "torchvision); loaded its pure-Python parts only."
            )
            return torchvision
        finally:
            _HOOK.active = True


class _RepairedModuleLoader(importlib.abc.Loader):
    """Hands the import system the torchvision module that :func:`_import_repairing` imported."""

    def __init__(self) -> None:
        self.real_spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module = _import_repairing()
        if module is None:
            raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
        self.real_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        if self.real_spec is not None:
            module.__spec__ = self.real_spec  # the import system set ours; give back torchvision's own


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    """Routes the process's first ``import torchvision`` through the repair."""

    active = True

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torchvision" or not self.active or _done:
            return None
        self.active = False
        try:
            real = importlib.machinery.PathFinder.find_spec(fullname, path)
        finally:
            self.active = True
        if real is None:
            return None  # not installed: the normal ModuleNotFoundError follows
        loader = _RepairedModuleLoader()
        spec = importlib.machinery.ModuleSpec(fullname, loader, origin=real.origin, is_package=True)
        spec.submodule_search_locations = real.submodule_search_locations
        return spec


_HOOK = _TorchvisionHook()


def install_import_hook() -> None:
    """Put the hook first on ``sys.meta_path`` (once); cheap, imports nothing."""
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def ensure_torchvision() -> None:
    """Import torchvision, repairing the CPU-torch/CUDA-torchvision mismatch if it occurs."""
    install_import_hook()
    _import_repairing()


install_import_hook()  # importing this module (``import captionkit`` does) is enough
