"""Executors beyond this process: a Ray cluster (``--executor ray``) and every GPU of one machine (``--devices``).

All of them run the same step objects as :class:`captionkit.executors.local.LocalExecutor` and
commit through its ``_save``: only the driver (the process that was started) writes the
store and the sidecars; workers return raw results. :func:`make_executor` picks one.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

from captionkit.core.errors import CaptionkitError
from captionkit.executors.local import LocalExecutor, RunOptions
from captionkit.executors.progress import Progress
from captionkit.steps.base import Prepared

EXECUTORS = ("local", "ray")


def parse_devices(devices: str | Sequence[str] | None) -> list[str]:
    """``"cuda:0,cuda:1"`` (or a list) → ``["cuda:0", "cuda:1"]``; checked for form, not for presence."""
    import re

    if devices is None:
        return []
    parts = devices.split(",") if isinstance(devices, str) else [str(part) for part in devices]
    found = [part.strip() for part in parts if part.strip()]
    for device in found:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
            raise CaptionkitError(f"--devices {device}: use a comma-separated list of cuda:N (or cpu, for tests).")
    return found


def make_executor(
    executor: str = "local",
    options: RunOptions | None = None,
    progress: Progress | None = None,
    *,
    ray_address: str | None = None,
    devices: str | Sequence[str] | None = None,
    ray_actors: int | None = None,
    ray_gpus_per_actor: float | None = None,
    ray_cpus_per_actor: float = 1.0,
    ray_decode_cpus: float = 1.0,
    ray_stall_timeout: float | None = None,
) -> LocalExecutor:
    """The executor for ``--executor`` and ``--devices`` (errors name the option and the fix)."""
    if executor not in EXECUTORS:
        raise CaptionkitError(f"--executor {executor}: use one of {', '.join(EXECUTORS)}.")
    chosen = parse_devices(devices)
    if executor == "ray":
        if chosen:
            raise CaptionkitError("--devices is for one machine without Ray; with --executor ray, Ray places "
                                  "one actor per GPU (--ray-gpus-per-actor).")
        from captionkit.executors.ray_executor import RayExecutor, require_ray

        require_ray()
        return RayExecutor(options, progress, address=ray_address, num_actors=ray_actors,
                           gpus_per_actor=ray_gpus_per_actor, cpus_per_actor=ray_cpus_per_actor,
                           decode_cpus=ray_decode_cpus,
                           **({} if ray_stall_timeout is None else {"stall_timeout_s": ray_stall_timeout}))
    if ray_address is not None:
        raise CaptionkitError("--ray-address needs --executor ray.")
    if chosen:
        from captionkit.executors.devices import DeviceExecutor

        return DeviceExecutor(options, progress, devices=chosen)
    return LocalExecutor(options, progress)


# ------------------------------------------------------------------------------------- shared by workers
def use_device(step: Any, device: str) -> None:
    """Point a step (before ``load``) at ``device``; a step without one is refused with the reason."""
    if hasattr(step, "use_device"):
        step.use_device(device)
    elif hasattr(step, "device_name"):  # the image generator
        step.device_name = device
    else:
        raise CaptionkitError(f"the {step.field} step does not run a model on a device of this machine.")


def runs_on_device(step: Any) -> bool:
    """True for a step whose model runs in its worker on a device that can be chosen (not a server)."""
    if hasattr(step, "takes_device"):
        return bool(step.takes_device)
    return hasattr(step, "use_device") or hasattr(step, "device_name")


def portable(step: Any, dumps=pickle.dumps) -> bytes:
    """The step pickled for workers, or why it cannot be (a server client, an open connection)."""
    try:
        return dumps(step)
    except Exception as error:  # pickling raises TypeError, PicklingError, AttributeError ...
        raise CaptionkitError(
            f"the {step.field} step cannot be sent to worker processes ({error}); --executor ray and --devices "
            "are for models that load in the worker (Florence-2, chat VLMs on transformers or vLLM, taggers). "
            "For an OpenAI-compatible server, raise --concurrency instead.") from error


def on_device(step: Any, device: str | None, dumps=pickle.dumps) -> Any:
    """A copy of ``step`` as a worker on ``device`` sees it (a pickle round trip, so the driver's is untouched)."""
    copy = pickle.loads(portable(step, dumps))
    if device is not None and runs_on_device(copy):
        use_device(copy, device)
    return copy


def light(item: Prepared) -> Prepared:
    """What the driver needs of a prepared item to save it: everything but the payload."""
    return Prepared(item.record, None, item.original_size, item.content_hash, list(item.notes))
