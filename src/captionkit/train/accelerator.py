"""One way for both trainers to get an ``accelerate.Accelerator``.

Why: accelerate keeps one process-wide state (precision, device). A second training
run in the same process (a notebook, a test suite, a sweep) with another precision
would otherwise fail with "AcceleratorState has already been initialized".
"""

from __future__ import annotations

from typing import Any


def new_accelerator(**options: Any):
    """An Accelerator with ``options``, clearing accelerate's shared state when it disagrees."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        state = AcceleratorState()
        wants_cpu = bool(options.get("cpu"))
        if str(state.mixed_precision) != str(options.get("mixed_precision", "no")) or (
                wants_cpu and state.device.type != "cpu"):
            AcceleratorState._reset_state()
    return Accelerator(**options)
