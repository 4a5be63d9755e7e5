"""Tagger models: a score per tag per image, from any of the three folder formats.

Formats, read from the files present (never guessed from the name):

* ``captionkit-timm`` — a tagger trained here: ``config.json`` with a ``captionkit``
  section, ``model.safetensors``, ``selected_tags.csv``, ``thresholds.json`` and
  ``preprocess.json``. It is a superset of the WD timm layout below.
* ``wd-timm`` — SmilingWolf's timm WD v3 repos: ``config.json`` with ``architecture``,
  ``num_classes``, ``model_args`` and ``pretrained_cfg``, ``model.safetensors`` (or
  ``pytorch_model.bin``) and ``selected_tags.csv``. Input is NCHW normalised with the
  ``pretrained_cfg`` mean/std, channels in BGR order: the reference script the repos
  were published with (neggles' ``wdv3-timm``) swaps RGB→BGR after the timm transform,
  because the weights were converted from the BGR-trained JAX models.
* ``wd-onnx`` — ``model.onnx`` + ``selected_tags.csv``: NHWC, BGR, float 0-255 at the
  input size written in the graph; outputs are already probabilities. A folder holding
  both timm weights and ``model.onnx`` loads the timm weights; pass the path of the
  ``.onnx`` file to choose ONNX.

Every format pads to a square on white (centred) and resizes with bicubic filtering,
as the WD reference code does. :meth:`TaggerModel.preprocess` runs in worker threads
and touches no shared state; :meth:`TaggerModel.predict` runs the batch.
"""

from __future__ import annotations

import csv
import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from captionkit.core.errors import CaptionkitError, ModelNotAvailableError
from captionkit.models import release

_log = logging.getLogger(__name__)

FORMAT_CAPTIONKIT = "captionkit-timm"
FORMAT_WD_TIMM = "wd-timm"
FORMAT_WD_ONNX = "wd-onnx"

TAGS_FILE = "selected_tags.csv"
CONFIG_FILE = "config.json"
THRESHOLDS_FILE = "thresholds.json"
PREPROCESS_FILE = "preprocess.json"
ONNX_FILE = "model.onnx"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

#: The defaults the WD model cards and the reference Space use.
WD_DEFAULT_THRESHOLDS = {"general": 0.35, "character": 0.85}

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class ModelNotFoundError(ModelNotAvailableError):
    """The tagger is neither a local folder nor downloadable (e.g. offline)."""


class TaggerLoadError(CaptionkitError):
    """A tagger folder is present but unusable (missing file, bad config, device problem)."""


# -- vocabulary -----------------------------------------------------------------------------


@dataclass
class TagVocabulary:
    """The rows of a ``selected_tags.csv``: names, categories, counts, optional thresholds."""

    names: list[str]
    categories: list[int]
    counts: list[int | None]
    best_thresholds: list[float] | None = None


def read_selected_tags(path: str | Path) -> TagVocabulary:
    """Read a ``selected_tags.csv`` (columns ``name`` and optional ``category``, ``count``).

    ``tag_id`` is ignored (row order is the model's output order); a ``best_threshold``
    column (animetimm style) is read as per-tag thresholds.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            if reader.fieldnames is None or "name" not in reader.fieldnames:
                raise TaggerLoadError(
                    f"{path}: no 'name' column (found {reader.fieldnames}); "
                    "the first row must be a header such as tag_id,name,category,count"
                )
            names: list[str] = []
            categories: list[int] = []
            counts: list[int | None] = []
            thresholds: list[float] = []
            has_thresholds = "best_threshold" in reader.fieldnames
            for line, row in enumerate(reader, start=2):
                name = (row.get("name") or "").strip()
                if not name:
                    raise TaggerLoadError(f"{path}:{line}: empty tag name; remove the row or name the tag")
                try:
                    category = int(row["category"]) if row.get("category") not in (None, "") else 0
                    count = int(float(row["count"])) if row.get("count") not in (None, "") else None
                    if has_thresholds:
                        thresholds.append(float(row["best_threshold"]))
                except ValueError as error:
                    raise TaggerLoadError(
                        f"{path}:{line}: {error}; category and count must be integers, "
                        "best_threshold a number"
                    ) from error
                names.append(name)
                categories.append(category)
                counts.append(count)
    except OSError as error:
        raise TaggerLoadError(f"{path}: cannot read the tag list ({error})") from error
    if not names:
        raise TaggerLoadError(f"{path}: the tag list is empty; the model needs at least one tag")
    return TagVocabulary(names, categories, counts, thresholds if has_thresholds else None)


# -- preprocessing --------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """How a PIL image becomes one model input row; stored as ``preprocess.json``.

    ``scale`` multiplies 0-255 pixel values before ``mean``/``std`` (``1/255`` for timm
    models, ``1.0`` for WD ONNX). ``crop_pct`` < 1 resizes larger and centre-crops, as
    timm's eval transform does.
    """

    size: tuple[int, int]  # (height, width)
    layout: str = "NCHW"  # or "NHWC"
    channel_order: str = "RGB"  # or "BGR"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] | None = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] | None = (0.5, 0.5, 0.5)
    pad_color: tuple[int, int, int] = (255, 255, 255)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"preprocessing layout must be NCHW or NHWC, got {self.layout!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"preprocessing channel_order must be RGB or BGR, got {self.channel_order!r}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(
                f"preprocessing interpolation {self.interpolation!r} is not one of {sorted(_INTERPOLATION)}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["size"] = list(self.size)
        for key in ("mean", "std", "pad_color"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        size = known.get("size")
        if isinstance(size, int):
            size = (size, size)
        known["size"] = tuple(int(v) for v in size)
        for key in ("mean", "std", "pad_color"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Pad to a centred square, resize, then lay out and normalise as float32."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        side = max(width, height)
        if width != height:
            canvas = Image.new("RGB", (side, side), self.pad_color)
            canvas.paste(image, ((side - width) // 2, (side - height) // 2))
            image = canvas
        target_h, target_w = self.size
        resample = _INTERPOLATION[self.interpolation]
        if self.crop_pct < 1.0:
            scaled_h, scaled_w = int(target_h / self.crop_pct), int(target_w / self.crop_pct)
            image = image.resize((scaled_w, scaled_h), resample)
            top, left = (scaled_h - target_h) // 2, (scaled_w - target_w) // 2
            image = image.crop((left, top, left + target_w, top + target_h))
        elif image.size != (target_w, target_h):
            image = image.resize((target_w, target_h), resample)
        array = np.asarray(image, dtype=np.float32)
        if self.channel_order == "BGR":
            array = array[:, :, ::-1]
        channels = (3,)
        if self.layout == "NCHW":  # a view: the first product is written in CHW order, the rest in place
            array, channels = array.transpose(2, 0, 1), (3, 1, 1)
        array = np.multiply(array, np.float32(self.scale), out=np.empty(array.shape, dtype=np.float32))
        if self.mean is not None:
            array -= np.asarray(self.mean, dtype=np.float32).reshape(channels)
        if self.std is not None:
            array /= np.asarray(self.std, dtype=np.float32).reshape(channels)
        return array


def preprocessing_from_pretrained_cfg(cfg: dict[str, Any], channel_order: str) -> Preprocessing:
    """timm ``pretrained_cfg`` → :class:`Preprocessing` (input size, mean/std, interpolation)."""
    input_size = cfg.get("input_size") or cfg.get("test_input_size") or [3, 224, 224]
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation not in _INTERPOLATION:
        interpolation = "bicubic"
    return Preprocessing(
        size=(int(input_size[-2]), int(input_size[-1])),
        layout="NCHW",
        channel_order=channel_order,
        scale=1.0 / 255.0,
        mean=tuple(cfg.get("mean") or (0.5, 0.5, 0.5)),
        std=tuple(cfg.get("std") or (0.5, 0.5, 0.5)),
        interpolation=interpolation,
        crop_pct=float(cfg.get("crop_pct") or 1.0),
    )


# -- the model ------------------------------------------------------------------------------


@dataclass
class TaggerModel:
    """A loaded tagger. Use :func:`load_tagger` to make one.

    ``tags``/``categories`` are aligned with the columns of :meth:`predict`.
    ``default_thresholds`` maps category names to the model's suggested thresholds and,
    when the model ships tuned per-tag thresholds, ``"per_tag"`` to a float32 array
    aligned with ``tags`` (pass it to :func:`captionkit.core.tagging.select_tags`).
    """

    format: str
    path: Path
    tags: list[str]
    categories: list[int]
    default_thresholds: dict[str, Any]
    preprocessing: Preprocessing
    device: str
    revision: str | None = None
    _runner: Any = field(default=None, repr=False)
    _weight_files: list[Path] = field(default_factory=list, repr=False)
    _fingerprint: dict | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One RGB PIL image → one float32 input row. Thread-safe (no shared state)."""
        return self.preprocessing(image)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``float32 [N, len(tags)]`` for a stack of :meth:`preprocess` outputs."""
        if self._runner is None:
            raise TaggerLoadError(f"{self.path}: the tagger was unloaded; load it again with load_tagger")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.tags)), dtype=np.float32)
        scores = self._runner(batch)
        if scores.shape != (batch.shape[0], len(self.tags)):
            raise TaggerLoadError(
                f"{self.path}: the model returned scores of shape {tuple(scores.shape)} for "
                f"{batch.shape[0]} images and {len(self.tags)} tags; selected_tags.csv does not "
                "match the model's outputs"
            )
        return scores

    def fingerprint(self) -> dict[str, Any]:
        """What identifies these scores: format, revision, the files' SHA-256 (not where the folder is)."""
        from captionkit.core.identity import file_digest

        with self._lock:
            if self._fingerprint is None:
                files = {}
                for path in [*self._weight_files, self.path / TAGS_FILE, self.path / THRESHOLDS_FILE,
                             self.path / PREPROCESS_FILE]:
                    if path.is_file() and path.name not in files:
                        files[path.name] = file_digest(path)
                self._fingerprint = {
                    "format": self.format,
                    "revision": self.revision,
                    "files": files,
                    "preprocessing": self.preprocessing.to_dict(),
                }
            return dict(self._fingerprint)

    def unload(self) -> None:
        """Free the weights (and accelerator memory); :meth:`predict` fails afterwards."""
        release(self, "_runner")


# -- runners --------------------------------------------------------------------------------


class _TimmRunner:
    """Holds a timm model on a device; sigmoid on top because the heads emit logits."""

    def __init__(self, model: Any, device: str) -> None:
        self.model = model
        self.device = device

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            inputs = torch.from_numpy(batch).to(self.device, non_blocking=True)
            logits = self.model(inputs)
            return torch.sigmoid(logits.float()).cpu().numpy().astype(np.float32, copy=False)


class _OnnxRunner:
    """Holds an onnxruntime session; splits batches when the graph has a fixed batch size."""

    def __init__(self, session: Any, fixed_batch: int | None) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self.fixed_batch = fixed_batch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.fixed_batch is None:
            return self._run(batch)
        parts = []
        for start in range(0, batch.shape[0], self.fixed_batch):
            chunk = batch[start : start + self.fixed_batch]
            real = chunk.shape[0]
            if real < self.fixed_batch:
                padding = np.repeat(chunk[-1:], self.fixed_batch - real, axis=0)
                chunk = np.concatenate([chunk, padding])
            parts.append(self._run(chunk)[:real])
        return np.concatenate(parts)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([self.output_name], {self.input_name: batch})[0], dtype=np.float32)


# -- resolution and loading -----------------------------------------------------------------


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))


def _resolve(name_or_path: str, cache_dir: str | Path | None) -> tuple[Path, str | None, bool]:
    """Local folder/file, or a hub snapshot. Returns (folder, revision, onnx_file_chosen)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix == ".onnx":
            return path.parent, None, True
        raise ModelNotFoundError(
            f"{path}: a tagger is a folder (or a model.onnx file), not {path.suffix or 'this'} file; "
            "pass the folder with --model LOCAL_FOLDER"
        )
    if path.is_dir():
        return path, None, False
    if not _looks_like_hub_id(name_or_path):
        raise ModelNotFoundError(
            f"Tagger '{name_or_path}' is not a local folder or a hub id (owner/name); "
            "pass a downloaded tagger folder with --model LOCAL_FOLDER."
        )
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            name_or_path,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            allow_patterns=["*.json", "*.csv", "*.onnx", "*.safetensors", "*.bin"],
        )
    except Exception as error:  # offline, missing repo, gated repo: all the same for the user
        raise ModelNotFoundError(
            f"Tagger '{name_or_path}' could not be found locally or downloaded from the Hugging Face "
            f"Hub ({type(error).__name__}); download it where you have internet and pass the folder "
            "with --model LOCAL_FOLDER."
        ) from error
    folder_path = Path(folder)
    return folder_path, folder_path.name if folder_path.parent.name == "snapshots" else None, False


def detect_format(folder: Path, prefer_onnx: bool = False) -> str:
    """Which of the three formats a folder holds, from its files."""
    config_path = folder / CONFIG_FILE
    has_onnx = (folder / ONNX_FILE).is_file()
    if prefer_onnx and has_onnx:
        return FORMAT_WD_ONNX
    if config_path.is_file() and any((folder / name).is_file() for name in WEIGHT_FILES):
        config = _read_json(config_path)
        if "captionkit" in config:
            return FORMAT_CAPTIONKIT
        if "architecture" in config:
            return FORMAT_WD_TIMM
    if has_onnx:
        return FORMAT_WD_ONNX
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if (folder / "best" / CONFIG_FILE).is_file():
        raise TaggerLoadError(
            f"{folder}: this is a tagger training run, not a model; pass --model {folder / 'best'} "
            f"(best validation score) or --model {folder / 'final'} (last epoch)"
        )
    raise TaggerLoadError(
        f"{folder}: not a tagger folder (found {present[:12]}); a tagger needs either "
        f"{ONNX_FILE} + {TAGS_FILE} (WD ONNX) or {CONFIG_FILE} with 'architecture' + "
        f"model.safetensors + {TAGS_FILE} (timm)"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise TaggerLoadError(
            f"{path}: cannot read JSON ({error}); restore the file from the model"
        ) from error
    if not isinstance(data, dict):
        raise TaggerLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_thresholds(folder: Path, vocabulary: TagVocabulary, base: dict[str, float]) -> dict[str, Any]:
    """Per-category defaults plus per-tag thresholds from ``thresholds.json`` or the CSV column."""
    thresholds: dict[str, Any] = dict(base)
    path = folder / THRESHOLDS_FILE
    if path.is_file():
        data = _read_json(path)
        for key, value in (data.get("categories") or {}).items():
            thresholds[str(key)] = float(value)
        per_tag = data.get("per_tag")
        if per_tag is not None:
            if isinstance(per_tag, dict):
                missing = [name for name in vocabulary.names if name not in per_tag]
                if missing:
                    raise TaggerLoadError(
                        f"{path}: per_tag has no threshold for {missing[:5]}; re-export the model"
                    )
                per_tag = [per_tag[name] for name in vocabulary.names]
            if len(per_tag) != len(vocabulary.names):
                raise TaggerLoadError(
                    f"{path}: {len(per_tag)} per-tag thresholds for {len(vocabulary.names)} tags; "
                    "re-export the model"
                )
            thresholds["per_tag"] = np.asarray(per_tag, dtype=np.float32)
    elif vocabulary.best_thresholds is not None:
        thresholds["per_tag"] = np.asarray(vocabulary.best_thresholds, dtype=np.float32)
    return thresholds


def _torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") or device == "gpu":
        if not torch.cuda.is_available():
            raise TaggerLoadError(
                f"device '{device}' was asked for but torch sees no CUDA GPU (torch {torch.__version__}); "
                "install a CUDA build of torch or pass --device cpu"
            )
        return "cuda" if device == "gpu" else device
    if device == "mps" and not torch.backends.mps.is_available():
        raise TaggerLoadError("device 'mps' was asked for but is not available; pass --device cpu")
    return device


def _load_timm(folder: Path, fmt: str, device: str) -> tuple[Any, Preprocessing, list[Path], int]:
    from captionkit._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    import timm
    import torch

    config = _read_json(folder / CONFIG_FILE)
    architecture = config.get("architecture")
    if not architecture:
        raise TaggerLoadError(f"{folder / CONFIG_FILE}: no 'architecture' key; this is not a timm config")
    num_classes = int(config.get("num_classes") or config.get("pretrained_cfg", {}).get("num_classes") or 0)
    model_args = dict(config.get("model_args") or {})
    model_args.pop("num_classes", None)
    try:
        model = timm.create_model(architecture, pretrained=False, num_classes=num_classes, **model_args)
    except Exception as error:
        raise TaggerLoadError(
            f"{folder / CONFIG_FILE}: timm cannot build '{architecture}' ({error}); "
            f"upgrade timm (installed {timm.__version__}) or fix the config"
        ) from error
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise TaggerLoadError(f"{folder}: no model.safetensors or pytorch_model.bin next to config.json")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise TaggerLoadError(
            f"{weights}: the weights do not fit '{architecture}' with {num_classes} classes "
            f"({str(error).splitlines()[0]}); the config and weights come from different models"
        ) from error
    model.eval().to(device)
    return model, _timm_preprocessing(folder, fmt, config), [weights, folder / CONFIG_FILE], num_classes


def _timm_preprocessing(folder: Path, fmt: str, config: dict[str, Any]) -> Preprocessing:
    """``preprocess.json`` when the folder has one, else the timm config's ``pretrained_cfg``."""
    preprocess_path = folder / PREPROCESS_FILE
    if preprocess_path.is_file():
        try:
            return Preprocessing.from_dict(_read_json(preprocess_path))
        except (TypeError, ValueError, KeyError) as error:
            raise TaggerLoadError(
                f"{preprocess_path}: invalid preprocessing ({error}); re-export the model"
            ) from error
    channel_order = "BGR" if fmt == FORMAT_WD_TIMM else "RGB"
    return preprocessing_from_pretrained_cfg(config.get("pretrained_cfg") or {}, channel_order)


def _onnx_preprocessing(model_path: Path, shape: list[Any]) -> Preprocessing:
    """A WD ONNX tagger's input (``[batch, height, width, 3]``, BGR, 0-255) from its input shape."""
    if len(shape) != 4:
        raise TaggerLoadError(f"{model_path}: expected a 4-D image input, got shape {shape}")
    if shape[3] == 3 and isinstance(shape[1], int):
        layout, height, width = "NHWC", shape[1], shape[2]
    elif shape[1] == 3 and isinstance(shape[2], int):
        layout, height, width = "NCHW", shape[2], shape[3]
    else:
        raise TaggerLoadError(
            f"{model_path}: cannot read the input size from shape {shape}; WD taggers take "
            "[batch, height, width, 3]"
        )
    return Preprocessing(
        size=(int(height), int(width)), layout=layout, channel_order="BGR", scale=1.0, mean=None, std=None
    )


def load_preprocessing(name_or_path: str, cache_dir: str | Path | None = None) -> Preprocessing:
    """How the tagger wants its images, read without loading its weights (for decode workers elsewhere)."""
    folder, _, prefer_onnx = _resolve(str(name_or_path), cache_dir)
    fmt = detect_format(folder, prefer_onnx=prefer_onnx)
    if fmt != FORMAT_WD_ONNX:
        return _timm_preprocessing(folder, fmt, _read_json(folder / CONFIG_FILE))
    from captionkit.core.errors import require

    onnx = require("onnx", "ONNX taggers", extra="onnx")
    model_path = folder / ONNX_FILE
    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as error:  # a protobuf DecodeError, an OSError ...
        raise TaggerLoadError(f"{model_path}: onnx cannot read the model ({error})") from error
    initializers = {item.name for item in graph.initializer}
    first = next(item for item in graph.input if item.name not in initializers)
    shape = [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
             for dim in first.type.tensor_type.shape.dim]
    return _onnx_preprocessing(model_path, shape)


def _onnx_providers(device: str) -> tuple[list[Any], bool]:
    """(providers, cuda_required) for an ORT session; a GPU request without CUDA fails loudly."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wants_gpu = device.startswith("cuda") or device == "gpu"
    if wants_gpu:
        if "CUDAExecutionProvider" not in available:
            raise TaggerLoadError(
                f"device '{device}' was asked for, but onnxruntime {ort.__version__} has no CUDA provider "
                f"(available: {', '.join(available)}); run `pip uninstall onnxruntime && pip install "
                "onnxruntime-gpu`, or pass --device cpu to run on the CPU on purpose"
            )
        device_id = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"], True
    if device == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], False
    if device not in ("auto", "cpu"):
        raise TaggerLoadError(
            f"device '{device}' is not supported for ONNX taggers; use auto, cpu or cuda[:N]"
        )
    return ["CPUExecutionProvider"], False


def _load_onnx(folder: Path, device: str) -> tuple[_OnnxRunner, Preprocessing, list[Path], str]:
    try:
        import onnxruntime as ort
    except ImportError as error:
        from captionkit.core.errors import MissingDependencyError

        raise MissingDependencyError("onnxruntime", "ONNX taggers", extra="onnx") from error
    providers, cuda_required = _onnx_providers(device)
    model_path = folder / ONNX_FILE
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    except Exception as error:
        raise TaggerLoadError(f"{model_path}: onnxruntime cannot load the model ({error})") from error
    active = session.get_providers()
    if cuda_required and "CUDAExecutionProvider" not in active:
        # ORT falls back to the CPU silently when the CUDA libraries fail to load.
        raise TaggerLoadError(
            f"{model_path}: the CUDA provider was asked for but onnxruntime fell back to {active} "
            "(CUDA/cuDNN libraries missing or mismatched); fix the CUDA install or pass --device cpu"
        )
    used = "cuda" if "CUDAExecutionProvider" in active else "cpu"
    shape = session.get_inputs()[0].shape
    preprocessing = _onnx_preprocessing(model_path, shape)
    fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return _OnnxRunner(session, fixed_batch), preprocessing, [model_path], used


def _vocabulary(folder: Path, fmt: str) -> tuple[TagVocabulary, dict[str, Any]]:
    """The tag list and the default thresholds, from the files beside the weights."""
    tags_path = folder / TAGS_FILE
    if not tags_path.is_file():
        raise TaggerLoadError(
            f"{folder}: {TAGS_FILE} is missing; the tagger needs its tag list next to the weights"
        )
    vocabulary = read_selected_tags(tags_path)
    base = {"general": 0.5, "character": 0.5} if fmt == FORMAT_CAPTIONKIT else dict(WD_DEFAULT_THRESHOLDS)
    return vocabulary, _read_thresholds(folder, vocabulary, base)


def load_vocabulary(name_or_path: str, cache_dir: str | Path | None = None) -> tuple[TagVocabulary, dict[str, Any]]:
    """The tag list and default thresholds without loading the weights (what rendering needs)."""
    folder, _, prefer_onnx = _resolve(str(name_or_path), cache_dir)
    return _vocabulary(folder, detect_format(folder, prefer_onnx=prefer_onnx))


def load_tagger(name_or_path: str, device: str = "auto", cache_dir: str | Path | None = None) -> TaggerModel:
    """Load a tagger from a local folder, a ``model.onnx`` path, or a hub id.

    ``device`` is ``auto`` (GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``; an
    explicit GPU request never falls back to the CPU silently. Raises
    :class:`ModelNotFoundError` when the model cannot be found or downloaded and
    :class:`TaggerLoadError` when its files are unusable.
    """
    folder, revision, prefer_onnx = _resolve(str(name_or_path), cache_dir)
    fmt = detect_format(folder, prefer_onnx=prefer_onnx)
    vocabulary, thresholds = _vocabulary(folder, fmt)
    if fmt == FORMAT_WD_ONNX:
        runner, preprocessing, weight_files, used_device = _load_onnx(folder, device)
    else:
        used_device = _torch_device(device)
        model, preprocessing, weight_files, num_classes = _load_timm(folder, fmt, used_device)
        if num_classes != len(vocabulary.names):
            raise TaggerLoadError(
                f"{folder}: config.json says {num_classes} classes but {TAGS_FILE} lists "
                f"{len(vocabulary.names)} tags; they must come from the same model"
            )
        runner = _TimmRunner(model, used_device)
    _log.info("loaded %s tagger %s (%d tags) on %s", fmt, folder, len(vocabulary.names), used_device)
    return TaggerModel(
        format=fmt,
        path=folder,
        tags=vocabulary.names,
        categories=vocabulary.categories,
        default_thresholds=thresholds,
        preprocessing=preprocessing,
        device=used_device,
        revision=revision,
        _runner=runner,
        _weight_files=weight_files,
    )
