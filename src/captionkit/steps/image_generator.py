"""The image_generator step: text-to-image with diffusers (FLUX.1, Stable Diffusion 3.5, any T2I pipeline).

Each record's prompt (its ``caption`` field, or ``prompt_template`` filled from its
fields) becomes ``samples`` images, written under ``<save_folder>/generated_images``
and named after the record id; the step's output field is the first image's path, so a
later step can caption or tag it. Text-only records (``path`` None) are the usual input.

Reproducibility: every image has its own seed, derived from (base seed, record id,
sample index) with SHA-256, and its own ``torch.Generator`` (on the CPU, so the starting
noise is the same on every device). A rerun in the same batches makes the same bytes;
in other batches the image is the same up to
:data:`BATCH_PIXEL_TOLERANCE` per channel value (batched matrix products may round the last
float bit differently). Another base ``seed`` makes other images. The filled prompt joins
each record's fingerprint, so editing one caption regenerates only that record; a stored
result whose image file was deleted is generated again.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

from captionkit.core.atomic import atomic_write_bytes
from captionkit.core.errors import CaptionkitError, require
from captionkit.core.records import Record
from captionkit.models import free_accelerator_memory, release
from captionkit.models.base import ItemFailure
from captionkit.steps.base import Prepared
from captionkit.steps.captioner import prompt_fields
from captionkit.steps.registry import StepContext, register_step

log = logging.getLogger(__name__)

OUTPUT_FOLDER = "generated_images"
# Largest difference of one 8-bit channel value between an image generated alone and in a batch.
BATCH_PIXEL_TOLERANCE = 1
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".jxl"}
_UNSAFE = re.compile(r"[^\w.-]+")
_MAX_NAME = 120

# Short names and hub ids of the models the step knows, with the settings their makers recommend.
# A key the config sets wins; a key neither sets is left to the pipeline's own default.
KNOWN_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "flux.1-dev": ("black-forest-labs/FLUX.1-dev", {"num_inference_steps": 28, "guidance_scale": 3.5}),
    "flux.1-schnell": ("black-forest-labs/FLUX.1-schnell",
                       {"num_inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256}),
    "sd3.5-large": ("stabilityai/stable-diffusion-3.5-large", {"num_inference_steps": 28, "guidance_scale": 3.5}),
    "sd3.5-large-turbo": ("stabilityai/stable-diffusion-3.5-large-turbo",
                          {"num_inference_steps": 4, "guidance_scale": 0.0}),
    "sd3.5-medium": ("stabilityai/stable-diffusion-3.5-medium", {"num_inference_steps": 40, "guidance_scale": 4.5}),
}
_SHORT_NAMES = {
    "flux-dev": "flux.1-dev", "flux1-dev": "flux.1-dev", "flux-schnell": "flux.1-schnell",
    "flux1-schnell": "flux.1-schnell", "stable-diffusion-3.5-large": "sd3.5-large",
    "stable-diffusion-3.5-large-turbo": "sd3.5-large-turbo", "stable-diffusion-3.5-medium": "sd3.5-medium",
}

KEYS: dict[str, Any] = {
    "model": str,
    "input_field": str,
    "prompt_template": str,
    "negative_prompt": str,
    "height": int,
    "width": int,
    "guidance_scale": (int, float),
    "num_inference_steps": int,
    "max_sequence_length": int,
    "samples": int,
    "seed": int,
    "batch_size": int,
    "device": str,
    "dtype": str,
    "image_format": str,
}
KEY_ALIASES = {"model_path": "model", "repeat_time": "samples"}


def resolve_model(name: str) -> tuple[str, dict[str, Any]]:
    """A short name (``flux.1-dev``) or hub id → (hub id or path, recommended settings); others pass through."""
    key = name.strip().lower()
    key = _SHORT_NAMES.get(key, key)
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key][0], dict(KNOWN_MODELS[key][1])
    for repo_id, defaults in KNOWN_MODELS.values():
        if key == repo_id.lower():
            return repo_id, dict(defaults)
    return name, {}


def derive_seed(base_seed: int, record_id: str, sample: int) -> int:
    """A 63-bit seed from (base seed, record id, sample index); the same on every machine and run."""
    digest = hashlib.sha256(f"{base_seed}\x00{record_id}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def image_stem(record_id: str) -> str:
    """A safe relative path (POSIX, no suffix) for a record's images; ``/`` in the id keeps sub-folders.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``, leading dots
    and ``..`` are dropped and an image suffix becomes part of the name (``cat.jpg`` → ``cat_jpg``,
    so ``cat.png`` gets another); when the id had to be changed beyond that, a short hash of it is
    appended so two ids cannot collide.
    """
    parts = [part for part in record_id.replace("\\", "/").split("/") if part]
    changed = False
    clean: list[str] = []
    for index, part in enumerate(parts):
        if index == len(parts) - 1 and Path(part).suffix.lower() in _IMAGE_SUFFIXES and Path(part).stem:
            part = f"{Path(part).stem}_{Path(part).suffix[1:]}"  # cat.jpg → cat_jpg: cat.png cannot collide
        safe = _UNSAFE.sub("_", part).lstrip(".")
        if len(safe) > _MAX_NAME:
            safe = safe[:_MAX_NAME]
        if safe != part:
            changed = True
        if safe:
            clean.append(safe)
    if not clean:
        clean, changed = ["record"], True
    if changed:
        clean[-1] += "-" + hashlib.sha1(record_id.encode()).hexdigest()[:8]
    return "/".join(clean)


def pipeline_class_name(folder: Path) -> str | None:
    """``_class_name`` from a diffusers folder's model_index.json (FluxPipeline, StableDiffusion3Pipeline, ...)."""
    try:
        return json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _template_fields(template: str) -> list[str]:
    """The fields a prompt_template names; an error names the key and shows how to write one."""
    try:
        fields = prompt_fields(template)
    except CaptionkitError:
        fields = [""]
    for name in fields:
        if not name.isidentifier():
            raise CaptionkitError(
                f"prompt_template {template!r}: write record fields like {{caption}} (a plain name in braces) "
                "and {{ }} for literal braces."
            )
    return list(dict.fromkeys(fields))


class ImageGeneratorStep:
    """Writes image paths: one text-to-image diffusers pipeline run over each record's prompt."""

    def __init__(
        self,
        model: str,
        save_folder: Path,
        field: str = "image",
        input_field: str = "caption",
        prompt_template: str | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        max_sequence_length: int | None = None,
        samples: int = 1,
        seed: int = 0,
        batch_size: int = 1,
        device: str = "auto",
        dtype: str = "auto",
        image_format: str = "png",
    ) -> None:
        self.model_name, defaults = resolve_model(model)
        self.field = field
        self.save_folder = Path(save_folder)
        # one sub-folder per step: two generator steps in a pipeline never write the same file
        self.output_folder = self.save_folder / OUTPUT_FOLDER / image_stem(field)
        self.input_field = input_field
        self.prompt_template = prompt_template
        self.fields = _template_fields(prompt_template) if prompt_template is not None else [input_field]
        self.negative_prompt = negative_prompt
        self.height = height
        self.width = width
        self.guidance_scale = guidance_scale if guidance_scale is not None else defaults.get("guidance_scale")
        self.num_inference_steps = (num_inference_steps if num_inference_steps is not None
                                    else defaults.get("num_inference_steps"))
        self.max_sequence_length = (max_sequence_length if max_sequence_length is not None
                                    else defaults.get("max_sequence_length"))
        self._max_sequence_length_given = max_sequence_length is not None
        self.samples = samples
        self.seed = seed
        self.batch_size = batch_size
        self.device_name = device
        self.dtype_name = dtype
        self.image_format = image_format
        self.pipeline: Any = None
        self.device: str | None = None
        self.pipeline_class: str | None = None
        self._call_parameters: set[str] = set()
        self._prompts: dict[str, str] = {}

    # settings ----------------------------------------------------------------
    def _is_local(self) -> bool:
        return Path(self.model_name).expanduser().exists()

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the pixels: model and its files, size, sampling, seed, precision, format."""
        from captionkit.models.florence2 import resolve_device, resolve_dtype

        if self._is_local():
            from captionkit.core.identity import LOCAL_MODEL, pipeline_revision

            folder = Path(self.model_name).expanduser()
            model_id, revision = LOCAL_MODEL, pipeline_revision(folder)
            pipeline_class = pipeline_class_name(folder)
        else:
            model_id, revision, pipeline_class = self.model_name, "main", None
        dtype = resolve_dtype(self.dtype_name, resolve_device(self.device_name), warn=False)
        return {
            "backend": "diffusers",
            "model": model_id,
            "revision": revision,
            "pipeline": pipeline_class,
            "height": self.height,
            "width": self.width,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length,
            "negative_prompt": self.negative_prompt,
            "samples": self.samples,
            "seed": self.seed,
            "dtype": str(dtype).removeprefix("torch."),
            "image_format": self.image_format,
        }

    def render_settings(self) -> dict[str, Any]:
        return {}

    def _fill(self, record: Record) -> str:
        """The record's prompt; raises CaptionkitError naming the missing field and the record."""
        known = {key: value for key, value in record.fields.items() if value is not None}
        for name in self.fields:
            if name not in known:
                have = ", ".join(sorted(map(str, known))) or "none"
                raise CaptionkitError(
                    f"record '{record.id}' has no field '{name}' for the image_generator prompt (its fields: {have}); "
                    f"give it a manifest column '{name}', run the step that writes it first, or set input_field"
                )
        if self.prompt_template is None:
            prompt = str(known[self.input_field])
        else:
            prompt = self.prompt_template.format(**{name: str(known[name]) for name in self.fields})
        if not prompt.strip():
            raise CaptionkitError(
                f"record '{record.id}': the image_generator prompt is empty (field '{self.fields[0]}' is blank)"
            )
        return prompt

    def record_settings(self, records: list[Record]) -> dict[str, dict[str, Any] | str]:
        """Per record: its filled prompt (part of its fingerprint), or why there is none."""
        settings: dict[str, dict[str, Any] | str] = {}
        for record in records:
            try:
                prompt = self._fill(record)
            except CaptionkitError as error:
                settings[record.id] = str(error)
                continue
            self._prompts[record.id] = prompt
            settings[record.id] = {"prompt": prompt}
        return settings

    # lifetime ----------------------------------------------------------------
    def load(self) -> None:
        """Load the diffusers pipeline on the chosen device and dtype (once) and check the size fits it."""
        if self.pipeline is not None:
            return
        from captionkit._torchvision_compat import ensure_torchvision
        from captionkit.models.florence2 import resolve_device, resolve_dtype

        ensure_torchvision()
        diffusers = require("diffusers", "the image_generator step", extra="diffusers")
        diffusers.utils.logging.disable_progress_bar()  # captionkit shows its own progress
        try:
            import transformers

            transformers.utils.logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - diffusers pipelines without text encoders
            pass
        device = resolve_device(self.device_name)
        dtype = resolve_dtype(self.dtype_name, device)
        local = self._is_local()
        if local and not (Path(self.model_name).expanduser() / "model_index.json").is_file():
            raise CaptionkitError(
                f"model {self.model_name}: no model_index.json in this folder; point model at a diffusers pipeline "
                "folder (as saved by save_pretrained or downloaded from the hub)."
            )
        source = str(Path(self.model_name).expanduser()) if local else self.model_name
        pipeline = self._from_pretrained(diffusers, source, dtype, local)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline_class = type(pipeline).__name__
        parameters = inspect.signature(pipeline.__call__).parameters
        self._call_parameters = set(parameters)
        if "prompt" not in parameters or any(
            name in ("image", "control_image") and parameter.default is inspect.Parameter.empty
            for name, parameter in parameters.items()
        ):
            raise CaptionkitError(
                f"model {self.model_name}: {self.pipeline_class} is not a text-to-image pipeline; the image_generator "
                "step needs one (FLUX.1, Stable Diffusion 3.5, SDXL, ...)."
            )
        if self._max_sequence_length_given and "max_sequence_length" not in parameters:
            raise CaptionkitError(
                f"max_sequence_length: {self.pipeline_class} ({self.model_name}) does not take it; it is for the "
                "T5 prompt of FLUX and Stable Diffusion 3 pipelines. Remove the key."
            )
        if self.negative_prompt and "negative_prompt" not in parameters:
            raise CaptionkitError(
                f"negative_prompt: {self.pipeline_class} ({self.model_name}) does not take a negative prompt. "
                "Remove the key."
            )
        if self.negative_prompt and "true_cfg_scale" in parameters:
            log.warning("negative_prompt: %s uses it only with true CFG (true_cfg_scale > 1), which this step "
                        "does not set; the negative prompt has no effect.", self.pipeline_class)
        self._check_size(pipeline)
        self.pipeline = pipeline.to(device)
        self.device = device

    def _from_pretrained(self, diffusers: Any, source: str, dtype: Any, local: bool) -> Any:
        # diffusers renamed torch_dtype to dtype (deprecating the old name); older releases know only torch_dtype.
        renamed = hasattr(getattr(diffusers.utils, "deprecation_utils", None), "_resolve_dtype")
        options = {"dtype" if renamed else "torch_dtype": dtype}
        try:
            try:
                return diffusers.AutoPipelineForText2Image.from_pretrained(source, **options)
            except ValueError as error:  # a pipeline class the auto mapping does not list
                if "pipeline" not in str(error).lower():
                    raise
                return diffusers.DiffusionPipeline.from_pretrained(source, **options)
        except (OSError, ValueError) as error:
            from captionkit.core.environment import broken_environment

            if (broken := broken_environment(error)) is not None:  # the environment, not the folder
                raise broken from error
            if local:
                raise CaptionkitError(
                    f"model {self.model_name}: not a loadable diffusers pipeline folder ({error})."
                ) from error
            from captionkit.models import model_unavailable

            raise model_unavailable(self.model_name, error) from error

    def _check_size(self, pipeline: Any) -> None:
        """height/width must be multiples of what the VAE (and latent packing) divides by, or diffusers resizes."""
        scale = int(getattr(pipeline, "vae_scale_factor", 8) or 8)
        if self.pipeline_class and self.pipeline_class.startswith(("Flux", "StableDiffusion3")):
            scale *= 2  # FLUX packs 2×2 latents; SD3 patches them 2×2
        for key, value in (("height", self.height), ("width", self.width)):
            if value is not None and value % scale:
                lower = max(scale, value - value % scale)
                raise CaptionkitError(
                    f"{key} {value}: {self.pipeline_class} makes sizes that are multiples of {scale}; "
                    f"use {lower} or {lower + scale}."
                )

    def unload(self) -> None:
        """Free the pipeline and its accelerator memory; ``load`` may be called again later."""
        release(self, "pipeline")

    def recover_from_oom(self) -> None:
        free_accelerator_memory()

    # running -----------------------------------------------------------------
    def prepare(self, record: Record) -> Prepared:
        """The record's prompt (no image to decode). Thread-safe."""
        prompt = self._prompts.get(record.id)
        if prompt is None:
            prompt = self._fill(record)
        content_hash = hashlib.blake2b(prompt.encode("utf-8"), digest_size=16).hexdigest()
        return Prepared(record, prompt, (self.width or 0, self.height or 0), content_hash)

    def seeds(self, record_id: str) -> list[int]:
        return [derive_seed(self.seed, record_id, sample) for sample in range(self.samples)]

    def image_paths(self, record_id: str) -> list[str]:
        """Paths relative to save_folder (POSIX) of a record's images."""
        stem = f"{OUTPUT_FOLDER}/{image_stem(self.field)}/{image_stem(record_id)}"
        suffix = f".{self.image_format}"
        if self.samples == 1:
            return [f"{stem}{suffix}"]
        return [f"{stem}_{sample}{suffix}" for sample in range(self.samples)]

    def _call_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"output_type": "pil"}
        optional = {
            "height": self.height, "width": self.width, "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale, "max_sequence_length": self.max_sequence_length,
            "negative_prompt": self.negative_prompt,
        }
        for key, value in optional.items():
            if value is not None and key in self._call_parameters:
                options[key] = value
        return options

    def run_batch(self, items: list[Prepared]) -> list[Any]:
        """One pipeline call for every image of the batch, each with its own generator; then write the files."""
        import torch

        if self.pipeline is None:
            raise RuntimeError("image_generator: load() must be called before run_batch()")
        prompts: list[str] = []
        generators = []
        for item in items:
            for seed in self.seeds(item.record.id):
                prompts.append(item.payload)
                generators.append(torch.Generator("cpu").manual_seed(seed))
        options = self._call_options()
        if self.negative_prompt is not None and "negative_prompt" in options:
            options["negative_prompt"] = [self.negative_prompt] * len(prompts)
        with torch.inference_mode():
            output = self.pipeline(prompt=prompts, generator=generators, **options)
        images = list(output.images)
        flagged = list(getattr(output, "nsfw_content_detected", None) or [False] * len(images))
        results: list[Any] = []
        for position, item in enumerate(items):
            start = position * self.samples
            results.append(self._save(item.record.id, images[start:start + self.samples],
                                      flagged[start:start + self.samples]))
        return results

    def _save(self, record_id: str, images: list[Any], flagged: list[bool]) -> Any:
        if any(flagged):
            return ItemFailure(f"the pipeline's safety checker flagged an image of {record_id!r} (it returns a black "
                               "image); change the prompt or seed")
        paths = self.image_paths(record_id)
        try:
            for image, relative in zip(images, paths, strict=True):
                atomic_write_bytes(self.save_folder / relative, encode_image(image, self.image_format))
        except OSError as error:
            return ItemFailure(f"cannot write the generated image under {self.output_folder} ({error})")
        return {"images": paths, "seeds": self.seeds(record_id)}

    def outputs_present(self, raw: Any) -> bool:
        """True when every image of a stored result is still on disk: one the user deleted is made again."""
        images = raw.get("images") if isinstance(raw, dict) else None
        return bool(images) and all((self.save_folder / relative).is_file() for relative in images)

    def render(self, raw: Any) -> str:
        """The first image's absolute path: what later steps read."""
        images = raw.get("images") if isinstance(raw, dict) else None
        return str(self.save_folder / images[0]) if images else ""


def encode_image(image: Any, image_format: str) -> bytes:
    """A PIL image as PNG (lossless), JPEG (quality 95) or WebP (quality 95) bytes."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.save(buffer, format=IMAGE_FORMATS[image_format], quality=95)
    return buffer.getvalue()


# config ----------------------------------------------------------------------
def _value(config: dict[str, Any], key: str, kind: Any, name: str) -> Any:
    value = config.get(key)
    if value is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = {str: "text", int: "a whole number", (int, float): "a number"}.get(kind, str(kind))
        raise CaptionkitError(f"step '{name}': {key} must be {expected}, not {value!r}.")
    return value


def _positive(value: int | None, key: str, name: str, maximum: int | None = None) -> int | None:
    if value is not None and (value < 1 or (maximum is not None and value > maximum)):
        limit = f" and at most {maximum}" if maximum is not None else ""
        raise CaptionkitError(f"step '{name}': {key} must be at least 1{limit}, not {value}.")
    return value


@register_step(
    "image_generator",
    description="Generate images from each record's prompt with a diffusers text-to-image pipeline "
                "(FLUX.1, Stable Diffusion 3.5, any local pipeline folder); writes the first image's path.",
    aliases=("ImageGenerator", "FLUXGenerator", "StableDiffusionGenerator"),
    keys=KEYS,
    key_aliases=KEY_ALIASES,
    required=("model",),
    extras=("diffusers",),
    needs_images=False,
    writes_images=True,
)
def build_image_generator(config: dict[str, Any], context: StepContext) -> ImageGeneratorStep:
    """Validate the values of an image_generator config and build the step."""
    config = dict(config)
    for alias, canonical in KEY_ALIASES.items():
        if alias in config and canonical not in config:
            config[canonical] = config.pop(alias)
    name = context.name
    values = {key: _value(config, key, kind, name) for key, kind in KEYS.items()}
    if not values["model"] or not values["model"].strip():
        raise CaptionkitError(f"step '{name}': model is required (a hub id such as black-forest-labs/FLUX.1-dev, "
                              "a short name such as flux.1-dev or sd3.5-large, or a diffusers pipeline folder).")
    for key in ("height", "width", "num_inference_steps", "samples", "batch_size"):
        _positive(values[key], key, name)
    _positive(values["max_sequence_length"], "max_sequence_length", name, maximum=512)
    if values["guidance_scale"] is not None and values["guidance_scale"] < 0:
        raise CaptionkitError(f"step '{name}': guidance_scale must be 0 or more, not {values['guidance_scale']}.")
    if values["seed"] is not None and not 0 <= values["seed"] < 2**63:
        raise CaptionkitError(f"step '{name}': seed must be between 0 and 2**63-1, not {values['seed']}.")
    image_format = (values["image_format"] or "png").lower().removeprefix(".")
    image_format = {"jpeg": "jpg"}.get(image_format, image_format)
    if image_format not in IMAGE_FORMATS:
        raise CaptionkitError(f"step '{name}': image_format {values['image_format']!r}: use png, jpg or webp.")
    device = values["device"] or "auto"
    if not (device in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", device)):
        raise CaptionkitError(f"step '{name}': device {device!r}: use auto, cpu, cuda or cuda:N.")
    dtype = values["dtype"] or "auto"
    if dtype not in ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16"):
        raise CaptionkitError(f"step '{name}': dtype {dtype!r}: use auto, fp32, fp16 or bf16.")
    input_field = values["input_field"] or "caption"
    if not input_field.strip():
        raise CaptionkitError(f"step '{name}': input_field must name a record field, e.g. caption.")
    try:
        return ImageGeneratorStep(
            model=values["model"].strip(),
            save_folder=context.save_folder,
            field=context.output_field,
            input_field=input_field,
            prompt_template=values["prompt_template"],
            negative_prompt=values["negative_prompt"],
            height=values["height"],
            width=values["width"],
            guidance_scale=None if values["guidance_scale"] is None else float(values["guidance_scale"]),
            num_inference_steps=values["num_inference_steps"],
            max_sequence_length=values["max_sequence_length"],
            samples=values["samples"] or 1,
            seed=values["seed"] if values["seed"] is not None else 0,
            batch_size=values["batch_size"] or 1,
            device=device,
            dtype=dtype,
            image_format=image_format,
        )
    except CaptionkitError as error:
        raise CaptionkitError(f"step '{name}': {error}") from error
