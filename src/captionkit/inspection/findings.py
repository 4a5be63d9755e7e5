"""What inspection can find: every kind, its severity and what it means for training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Kind:
    name: str
    severity: str  # error: breaks or poisons training; warning: degrades it; info: worth a look
    group: str  # captions, images, tags
    title: str
    why: str


_KINDS = [
    Kind("caption_missing", "error", "captions", "Images without a caption",
         "The trainer sees no text for them (or only the class prompt)."),
    Kind("caption_empty", "error", "captions", "Empty captions", "A caption file or stored caption with no text."),
    Kind("caption_too_long", "warning", "captions", "Captions over CLIP's token limit",
         "CLIP's text encoder sees 77 tokens (start and end included); the rest is cut silently."),
    Kind("caption_too_long_t5", "warning", "captions", "Captions over T5's token limit",
         "T5 encoders are run with 256 (SD3, Flux schnell) or 512 (Flux dev) tokens; the rest is cut."),
    Kind("caption_loop", "error", "captions", "Repeated-phrase loops",
         "A captioner stuck repeating itself; the model learns the stutter."),
    Kind("caption_refusal", "error", "captions", "Refusals", "A model's 'I'm sorry, I can't' instead of a caption."),
    Kind("caption_unclean_text", "warning", "captions", "Control characters, U+FFFD or line breaks in captions",
         "Invisible codes and U+FFFD (an undecodable byte) become tokens the model learns; kohya reads only a "
         "caption's first line, OneTrainer one line at random. `captionkit caption` cleans these unless "
         "--no-cleanup."),
    Kind("caption_filler_opener", "info", "captions", "Filler openers",
         "'The image shows ...' on every caption teaches nothing and costs tokens."),
    Kind("duplicate_caption", "warning", "captions", "Identical captions on different images",
         "The same text for different pictures blurs what the words mean."),
    Kind("trigger_missing", "error", "captions", "Captions without the trigger word",
         "Images whose caption does not contain the trigger teach the concept without its name."),
    Kind("orphan_caption", "warning", "captions", "Caption files with no image",
         "Left over from renamed or deleted images, or a wrong extension."),
    Kind("file_not_utf8", "error", "captions", "Text files that are not UTF-8",
         "Trainers read captions as UTF-8: they crash or read garbled characters."),
    Kind("file_bom", "warning", "captions", "Text files with a byte-order mark",
         "Some trainers keep the invisible U+FEFF as the caption's first character."),
    Kind("image_unreadable", "error", "images", "Unreadable images",
         "Files a trainer cannot decode: it crashes or skips them."),
    Kind("image_tiny", "error", "images", "Tiny images",
         "The shorter side is below the smallest bucket side: blown up into blur."),
    Kind("image_below_resolution", "warning", "images", "Images upscaled to fit their bucket",
         "Smaller than their bucket at the target resolution: the trainer upscales them (soft results)."),
    Kind("odd_aspect_ratio", "warning", "images", "Odd aspect ratios",
         "No bucket fits them: a large part of the picture is cropped away."),
    Kind("duplicate_image", "warning", "images", "Exact duplicate images", "Byte-identical files: trained twice."),
    Kind("near_duplicate_image", "warning", "images", "Near-duplicate images",
         "Perceptual hashes within the threshold: re-encodes, resizes or small edits of one picture."),
    Kind("rare_tag", "info", "tags", "Rare tags (long tail)", "Tags seen too seldom for a model to learn them."),
    Kind("ubiquitous_tag", "info", "tags", "Tags on nearly every image",
         "A tag on every image says nothing about any one of them (trigger words excepted)."),
    Kind("tag_caption_contradiction", "warning", "tags", "Tags contradicting captions",
         "A tag and the caption of the same image disagree (e.g. '1boy' beside a caption about a woman)."),
]
KINDS: dict[str, Kind] = {kind.name: kind for kind in _KINDS}


@dataclass
class Finding:
    """One problem: the file it is about (a record id or a path under the data set), what and details."""

    kind: str
    file: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # every file of a group (duplicates), first is ``file``
    path: str | None = None  # absolute path of ``file``, for links

    @property
    def severity(self) -> str:
        return KINDS[self.kind].severity

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "severity": self.severity, "file": self.file,
                                "path": self.path, "message": self.message}
        if self.files:
            data["files"] = self.files
        data["details"] = self.details
        return data


def resolve_fail_on(values: list[str]) -> set[str]:
    """Kinds selected by ``--fail-on`` values: kind names, severities (error, warning, info) or ``any``."""
    chosen: set[str] = set()
    for value in values:
        for part in (item.strip() for item in value.split(",")):
            if not part:
                continue
            if part == "any":
                chosen.update(KINDS)
            elif part in SEVERITIES:
                limit = SEVERITIES.index(part)
                chosen.update(name for name, kind in KINDS.items() if SEVERITIES.index(kind.severity) <= limit)
            elif part in KINDS:
                chosen.add(part)
            else:
                import difflib

                close = difflib.get_close_matches(part, list(KINDS), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"--fail-on {part}: not a finding kind.{hint} Use any, error, warning, info or "
                                 f"one of: {', '.join(KINDS)}.")
    return chosen
