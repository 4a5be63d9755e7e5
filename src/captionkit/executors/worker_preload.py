"""What the ``--devices`` worker server imports once, before it forks each worker.

Why: a worker started with ``spawn`` is a fresh interpreter that imports torch, transformers and
torchvision (about 3-4 s of CPU) before it can load its model, and a restarted worker pays that
again. Workers forked from a server that imported them already start at the model load. Nothing
here touches CUDA, so each forked worker still initialises its own device.
"""

from captionkit._torchvision_compat import ensure_torchvision

ensure_torchvision()

import torch  # noqa: E402,F401 - imported for the forked workers
import transformers  # noqa: E402,F401

import captionkit.executors.devices  # noqa: E402,F401 - the workers' entry point
