"""The checks: entries in, findings and statistics out. Pure functions over collected facts."""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captionkit.core.tagging import category_name
from captionkit.core.text import (
    collapse_repetitions,
    is_refusal,
    normalise_whitespace,
    strip_filler_openers,
    unclean_characters,
)
from captionkit.inspection.buckets import Buckets
from captionkit.inspection.contradictions import find_contradictions
from captionkit.inspection.dataset import Collected, Entry, tag_key
from captionkit.inspection.findings import Finding
from captionkit.inspection.hashing import near_duplicate_pairs

CLIP_LIMIT = 77
T5_LIMITS = (256, 512)
_LISTED = 50  # files listed in one group finding (tags on many images)
_UNCLEAN_LABELS = {
    "control": lambda count: f"{count} control character{'s' if count != 1 else ''}",
    "replacement": lambda count: f"{count} U+FFFD replacement character{'s' if count != 1 else ''}",
    "line_breaks": lambda count: f"{count} line break{'s' if count != 1 else ''}",
}


@dataclass
class CheckOptions:
    caption_ext: str = ".txt"
    trigger: str | None = None
    clip_limit: int = CLIP_LIMIT
    resolution: tuple[int, int] = (1024, 1024)
    min_bucket: int = 256
    max_bucket: int = 2048
    bucket_step: int = 64
    min_side: int | None = None  # None: the smallest bucket side
    max_crop: float = 0.10
    near_duplicate_distance: int = 6
    min_count: int = 3
    common_fraction: float = 0.95
    common_min_images: int = 5


@dataclass
class CheckOutput:
    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    series: dict[str, list] = field(default_factory=dict)  # per-image values for plots


def summarise(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {
        "count": len(values), "min": ordered[0], "max": ordered[-1], "mean": round(statistics.fmean(values), 3),
        "median": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
    }


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _visible(text: str) -> str:
    """``text`` with control characters, line breaks and U+FFFD written as escapes (``\\x01``, ``\\n``)."""
    return "".join(char if char.isprintable() and char != "\ufffd" else ascii(char)[1:-1] for char in text)


def _without_path(message: str, path: Path | None) -> str:
    """The core's 'PATH: cause. fix' without the path (the table already names the file)."""
    if path is not None and message.startswith(f"{path}: "):
        return message[len(f"{path}: "):]
    return message


def may_loop(text: str, max_phrase_words: int = 12) -> bool:
    """False when ``collapse_repetitions`` cannot change ``text``: a cheap necessary condition.

    A phrase of k words repeated back to back 3 times (a single word 4 times) puts the same
    word at i, i+k and i+2k (and i+3k for k = 1); without such a triple there is no loop.
    """
    words = text.split()
    for size in range(1, max_phrase_words + 1):
        if size == 1:
            if any(a == b == c == d for a, b, c, d in zip(words, words[1:], words[2:], words[3:], strict=False)):
                return True
        elif len(words) < 3 * size:
            break
        elif any(a == b == c for a, b, c in zip(words, words[size:], words[2 * size:], strict=False)):
            return True
    return False


def caption_checks(entries: list[Entry], options: CheckOptions, clip_count: Callable[[str], int] | None,
                   t5_counts: Callable[[list[str]], list[int]] | None) -> CheckOutput:
    out = CheckOutput()
    trigger = (re.compile(r"(?<!\w)" + re.escape(options.trigger.strip()) + r"(?!\w)", re.IGNORECASE)
               if options.trigger and options.trigger.strip() else None)
    by_text: dict[str, list[Entry]] = defaultdict(list)
    clip_tokens: list[int] = []
    counted: list[tuple[Entry, str]] = []
    sources: Counter[str] = Counter()
    for entry in entries:
        if entry.path is None:
            continue
        if entry.caption is None:
            if entry.caption_failed:
                message = f"captioning failed and no caption file exists: {_short(entry.caption_failed)}"
            else:
                message = f"no caption: no {options.caption_ext} file, stored caption or manifest column"
            out.findings.append(Finding("caption_missing", entry.id, message, path=str(entry.path)))
            continue
        sources[entry.caption_source or "?"] += 1
        text = entry.caption.strip()
        where = {"source": entry.caption_source}
        if entry.caption_file is not None:
            where["caption_file"] = str(entry.caption_file)
        if not text:
            out.findings.append(Finding("caption_empty", entry.id, "the caption is empty", where,
                                        path=str(entry.path)))
            continue
        counted.append((entry, text))
        by_text[normalise_whitespace(text)].append(entry)
        if clip_count is not None:
            tokens = clip_count(text)
            clip_tokens.append(tokens)
            if tokens > options.clip_limit:
                out.findings.append(Finding(
                    "caption_too_long", entry.id,
                    f"{tokens} CLIP tokens, {tokens - options.clip_limit} over the limit of {options.clip_limit}",
                    {"tokens": tokens, "limit": options.clip_limit, "encoder": "CLIP", "caption": _short(text),
                     **where}, path=str(entry.path)))
        collapsed = collapse_repetitions(text) if may_loop(text) else text  # the core's rule, skipped when moot
        if collapsed != text:
            out.findings.append(Finding(
                "caption_loop", entry.id,
                f"repeats a phrase: {len(text.split())} words, {len(collapsed.split())} once collapsed",
                {"caption": _short(text), "collapsed": _short(collapsed), **where}, path=str(entry.path)))
        unclean = unclean_characters(text)
        if entry.caption_undecodable:  # file_not_utf8 says why; its U+FFFD are the reader's
            unclean.pop("replacement", None)
        if unclean:
            out.findings.append(Finding(
                "caption_unclean_text", entry.id, "has " + ", ".join(_UNCLEAN_LABELS[name](count)
                                                                      for name, count in unclean.items()),
                {**unclean, "caption": _short(_visible(text)), **where}, path=str(entry.path)))
        if is_refusal(text):
            out.findings.append(Finding("caption_refusal", entry.id, f"a refusal: \"{_short(text, 80)}\"",
                                        {"caption": _short(text), **where}, path=str(entry.path)))
        stripped = strip_filler_openers(text)
        if stripped != text:
            opener = text[: len(text) - len(stripped)].strip() or text.split()[0]
            out.findings.append(Finding("caption_filler_opener", entry.id, f"opens with \"{opener}\"",
                                        {"opener": opener, "caption": _short(text), **where}, path=str(entry.path)))
        if trigger is not None and not trigger.search(text):
            out.findings.append(Finding("trigger_missing", entry.id, f"no '{options.trigger}' in the caption",
                                        {"trigger": options.trigger, "caption": _short(text), **where},
                                        path=str(entry.path)))
    t5_tokens: list[int] = []
    if t5_counts is not None and counted:
        t5_tokens = t5_counts([text for _, text in counted])
        for (entry, text), tokens in zip(counted, t5_tokens, strict=True):
            over = [limit for limit in T5_LIMITS if tokens > limit]
            if over:
                limit = over[-1]
                out.findings.append(Finding(
                    "caption_too_long_t5", entry.id,
                    f"{tokens} T5 tokens, over {limit}" + (" (cut by SD3 and Flux schnell; Flux dev keeps 512)"
                                                           if limit == 256 else " (cut by every T5 setting)"),
                    {"tokens": tokens, "limit": limit, "encoder": "T5", "caption": _short(text)},
                    path=str(entry.path)))
    for text, group in by_text.items():
        if len(group) > 1:
            ids = [entry.id for entry in group]
            out.findings.append(Finding(
                "duplicate_caption", ids[0], f"the same caption on {len(ids)} images: \"{_short(text, 80)}\"",
                {"caption": _short(text), "count": len(ids)}, files=ids, path=str(group[0].path)))
    out.stats = {
        "with_caption": len(counted) + sum(1 for f in out.findings if f.kind == "caption_empty"),
        "sources": dict(sources),
        "clip_tokens": summarise(clip_tokens) | {"limit": options.clip_limit,
                                                 "over_limit": sum(t > options.clip_limit for t in clip_tokens)},
        "t5_tokens": (summarise(t5_tokens) | {f"over_{limit}": sum(t > limit for t in t5_tokens)
                                              for limit in T5_LIMITS}) if t5_counts is not None else None,
        "words": summarise([len(text.split()) for _, text in counted]),
    }
    out.series = {"clip_tokens": clip_tokens, "t5_tokens": t5_tokens}
    return out


def text_file_checks(collected: Collected) -> CheckOutput:
    out = CheckOutput()
    root = collected.sidecar_root
    seen: set[Path] = set()
    for owner, text_file in collected.text_files:
        if text_file.path in seen:
            continue
        seen.add(text_file.path)
        name = _relative(text_file.path, root)
        if text_file.encoding_problem:
            out.findings.append(Finding("file_not_utf8", name, text_file.encoding_problem, {"image": owner},
                                        path=str(text_file.path)))
        if text_file.bom:
            out.findings.append(Finding("file_bom", name, "starts with a UTF-8 byte-order mark (EF BB BF)",
                                        {"image": owner}, path=str(text_file.path)))
    for name, path in collected.orphans:
        out.findings.append(Finding("orphan_caption", name, f"no image named {path.stem}.* beside it",
                                    path=str(path)))
    return out


def _relative(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


def image_checks(entries: list[Entry], options: CheckOptions, perceptual: bool) -> CheckOutput:
    out = CheckOutput()
    buckets = Buckets(options.resolution, options.min_bucket, options.max_bucket, options.bucket_step)
    min_side = options.min_side if options.min_side is not None else options.min_bucket
    bucket_counts: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    widths: list[int] = []
    heights: list[int] = []
    ratios: list[float] = []
    scales: list[float] = []
    by_hash: dict[str, list[Entry]] = defaultdict(list)
    readable: list[Entry] = []
    for entry in entries:
        if entry.path is None:
            continue
        if entry.error is not None:
            out.findings.append(Finding("image_unreadable", entry.id, _without_path(entry.error, entry.path),
                                        {"error": entry.error}, path=str(entry.path)))
            continue
        if entry.width is None or entry.height is None:
            continue
        readable.append(entry)
        width, height = entry.width, entry.height
        fit = buckets.fit(width, height)
        bucket_counts[fit.name] += 1
        formats[entry.format or "?"] += 1
        widths.append(width)
        heights.append(height)
        ratios.append(width / height)
        scales.append(fit.scale)
        facts = {"width": width, "height": height, "bucket": fit.name, "scale": round(fit.scale, 3),
                 "crop": round(fit.crop_fraction, 3)}
        if min(width, height) < min_side:
            out.findings.append(Finding(
                "image_tiny", entry.id, f"{width}x{height}: shorter side below {min_side}; upscaled "
                f"{fit.scale:.2f}x into bucket {fit.name}", facts, path=str(entry.path)))
        elif fit.upscaled:
            out.findings.append(Finding(
                "image_below_resolution", entry.id,
                f"{width}x{height} is upscaled {fit.scale:.2f}x to fill bucket {fit.name}", facts,
                path=str(entry.path)))
        if fit.crop_fraction > options.max_crop:
            long, short = max(width, height), min(width, height)
            out.findings.append(Finding(
                "odd_aspect_ratio", entry.id,
                f"{width}x{height} (aspect {long / short:.2f}:1): {fit.crop_fraction:.0%} cropped away in bucket "
                f"{fit.name}", facts | {"aspect_ratio": round(width / height, 4)}, path=str(entry.path)))
        if entry.content_hash:
            by_hash[entry.content_hash].append(entry)
    for content_hash, group in by_hash.items():
        if len(group) > 1:
            ids = [entry.id for entry in group]
            out.findings.append(Finding("duplicate_image", ids[0], f"{len(ids)} identical files: {', '.join(ids[:5])}"
                                        + (" ..." if len(ids) > 5 else ""), {"content_hash": content_hash},
                                        files=ids, path=str(group[0].path)))
    near_pairs = 0
    if perceptual:
        hashed = [entry for entry in readable if entry.phash is not None]
        for i, j, distance in near_duplicate_pairs([entry.phash for entry in hashed],
                                                   options.near_duplicate_distance):
            first, second = hashed[i], hashed[j]
            if first.content_hash and first.content_hash == second.content_hash:
                continue  # exact duplicates are reported as such
            near_pairs += 1
            out.findings.append(Finding(
                "near_duplicate_image", first.id, f"looks like {second.id} (perceptual hash distance {distance})",
                {"other": second.id, "other_path": str(second.path), "distance": distance,
                 "threshold": options.near_duplicate_distance}, files=[first.id, second.id], path=str(first.path)))
    megapixels = [w * h / 1e6 for w, h in zip(widths, heights, strict=True)]
    out.stats = {
        "readable": len(readable),
        "formats": dict(formats.most_common()),
        "width": summarise(widths), "height": summarise(heights), "megapixels": summarise(megapixels),
        "aspect_ratio": summarise(ratios),
        "buckets": {
            "resolution": f"{options.resolution[0]}x{options.resolution[1]}",
            "min": options.min_bucket, "max": options.max_bucket, "step": options.bucket_step,
            "available": len(buckets.resolutions),
            "counts": dict(sorted(bucket_counts.items(), key=lambda item: (-item[1], item[0]))),
        },
        "upscaled": sum(scale > 1.0 + 1e-9 for scale in scales),
        "scale": summarise(scales),
        "near_duplicate_pairs": near_pairs if perceptual else None,
    }
    out.series = {"width": widths, "height": heights, "aspect_ratio": ratios, "scale": scales,
                  "buckets": list(bucket_counts.items())}
    return out


def tag_checks(entries: list[Entry], options: CheckOptions, categories: dict[str, int]) -> CheckOutput:
    out = CheckOutput()
    tagged = [entry for entry in entries if entry.path is not None and entry.tags is not None]
    if not tagged:
        out.stats = {"tagged_images": 0}
        return out
    frequency: Counter[str] = Counter()
    written: dict[str, str] = {}
    holders: dict[str, list[str]] = defaultdict(list)
    for entry in tagged:
        keys = []
        for tag in entry.tags or []:
            key = tag_key(tag)
            if key not in keys:
                keys.append(key)
                written.setdefault(key, tag)
        for key in keys:
            frequency[key] += 1
            holders[key].append(entry.id)
        if entry.caption and entry.caption.strip() and not entry.same_file:
            for contradiction in find_contradictions(set(keys), entry.caption):
                out.findings.append(Finding(
                    "tag_caption_contradiction", entry.id, contradiction.describe(),
                    {"tag": contradiction.tag, "caption_words": list(contradiction.caption_words),
                     "rule": contradiction.rule, "caption": _short(entry.caption)}, path=str(entry.path)))
    count = len(tagged)
    trigger = tag_key(options.trigger) if options.trigger else None
    paths = {entry.id: entry.path for entry in tagged}
    for key, seen in sorted(frequency.items(), key=lambda item: (item[1], item[0])):
        if seen < options.min_count:
            ids = holders[key]
            out.findings.append(Finding(
                "rare_tag", ids[0], f"'{written[key]}' on {seen} image{'s' if seen != 1 else ''} "
                f"(fewer than {options.min_count})", {"tag": written[key], "count": seen},
                files=ids[:_LISTED], path=str(paths[ids[0]])))
    for key, seen in frequency.most_common():
        if count >= options.common_min_images and seen / count >= options.common_fraction and key != trigger:
            have = set(holders[key])
            lacking = [entry.id for entry in tagged if entry.id not in have]
            out.findings.append(Finding(
                "ubiquitous_tag", holders[key][0], f"'{written[key]}' on {seen} of {count} tagged images "
                f"({seen / count:.0%})", {"tag": written[key], "count": seen, "fraction": round(seen / count, 4),
                                          "missing_from": lacking[:_LISTED]}, path=str(paths[holders[key][0]])))
    per_category: dict[str, dict[str, int]] = {}
    if categories:
        for key, seen in frequency.items():
            number = categories.get(key)
            name = category_name(number) if number is not None else "unknown"
            bucket = per_category.setdefault(name, {"tags": 0, "occurrences": 0})
            bucket["tags"] += 1
            bucket["occurrences"] += seen
    below = [key for key, seen in frequency.items() if seen < options.min_count]
    out.stats = {
        "tagged_images": count,
        "distinct_tags": len(frequency),
        "occurrences": sum(frequency.values()),
        "per_image": summarise([len(entry.tags or []) for entry in tagged]),
        "long_tail": {"min_count": options.min_count, "tags_below": len(below),
                      "occurrences_below": sum(frequency[key] for key in below)},
        "categories": per_category or None,
        "frequency": {written[key]: seen for key, seen in frequency.most_common()},
    }
    out.series = {"frequency": [seen for _, seen in frequency.most_common()]}
    return out
