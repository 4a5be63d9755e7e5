"""The one place that makes a CUDA-only torchvision importable next to a CPU-only torch.

Why: some package indexes (this project's CI among them) offer torch as a CPU wheel but
torchvision only as a CUDA build. Importing that torchvision fails with
``RuntimeError: operator torchvision::nms does not exist`` because its compiled
operators do not load, and that failure also breaks timm and the torchvision-backed
image processors of transformers, which only need torchvision's pure-Python
transforms. When, and only when, that exact failure happens, we declare the schemas
of the two operators torchvision registers fake kernels for, then import again. The
compiled operators (nms, roi_align, ...) stay unavailable and raise if called;
captionkit never calls them. On a machine where torchvision imports normally
(a matching CUDA or CPU pair) this module does nothing.
"""

from __future__ import annotations

import logging
import sys

_log = logging.getLogger(__name__)
_done = False

_MISSING_OPERATOR_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def ensure_torchvision() -> None:
    """Import torchvision, repairing the CPU-torch/CUDA-torchvision mismatch if it occurs."""
    global _done
    if _done:
        return
    _done = True
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: callers that need it report their own install hint
    except RuntimeError as error:
        if "torchvision::" not in str(error) or "does not exist" not in str(error):
            raise
    for name in [module for module in sys.modules if module == "torchvision" or module.startswith("torchvision.")]:
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
    import torchvision  # noqa: F401,F811

    _log.info(
        "torchvision's compiled operators do not match this torch build (CPU torch with a CUDA "
        "torchvision); loaded its pure-Python parts only."
    )
