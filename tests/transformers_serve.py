"""Starts Hugging Face's own OpenAI-compatible server, ``transformers serve``, for the tests.

Run as ``python tests/transformers_serve.py serve MODEL --port P ...`` (the arguments of the
``transformers`` command). It is the ``transformers`` console script plus two repairs this
test environment needs, both for a CUDA-only torchvision next to a CPU-only torch:

- its compiled operators do not load, so importing torchvision fails
  (captionkit's ``ensure_torchvision`` repairs the import, as in every captionkit process);
- its image codecs do not load either, so ``torchvision.io.decode_image``, with which the
  server decodes a request's base64 image, raises "Couldn't load the image extension".
  Only then is it replaced by the same decoding done with Pillow (RGB, EXIF orientation
  applied, a ``[C, H, W]`` uint8 tensor), which is what the server asks of it.

The repairs run at import, outside the ``__main__`` guard, because the server loads the model
in a spawned process that imports this file again.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from captionkit._torchvision_compat import ensure_torchvision

ensure_torchvision()


def _image_codecs_load() -> bool:
    from torchvision.io import image

    try:
        image._assert_has_image_ops()
    except RuntimeError:
        return False
    return True


def _decode_with_pillow(source: Any, mode: Any = None, apply_exif_orientation: bool = False) -> Any:
    """``torchvision.io.decode_image`` for a path or a 1-D uint8 tensor of encoded bytes, through Pillow."""
    import numpy
    import torch
    from PIL import Image, ImageOps
    from torchvision.io import ImageReadMode

    if isinstance(source, torch.Tensor):
        opened = Image.open(io.BytesIO(source.numpy().tobytes()))
    else:
        opened = Image.open(source)
    if apply_exif_orientation:
        opened = ImageOps.exif_transpose(opened)
    modes = {ImageReadMode.RGB: "RGB", ImageReadMode.GRAY: "L", ImageReadMode.RGB_ALPHA: "RGBA",
             ImageReadMode.GRAY_ALPHA: "LA"}
    if mode in modes:
        opened = opened.convert(modes[mode])
    array = numpy.asarray(opened, dtype=numpy.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


if not _image_codecs_load():
    import torchvision.io

    torchvision.io.decode_image = _decode_with_pillow


if __name__ == "__main__":
    from transformers.cli.transformers import app

    sys.argv[0] = "transformers"
    app()
