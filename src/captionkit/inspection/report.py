"""The HTML report: one self-contained file (inline CSS, plots as embedded PNG), tables linking to files.

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch, no display needed). Links are relative to the report's folder, so the
report and the data set can move together; nothing refers to the network.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from captionkit.core.errors import MissingDependencyError
from captionkit.inspection.findings import KINDS, Finding

if TYPE_CHECKING:
    from captionkit.inspection import InspectionReport

ROWS_PER_KIND = 200
_COLOURS = {"error": "#c0392b", "warning": "#d68910", "info": "#2e86c1"}
_BAR = "#4a6fa5"
_LIMIT = "#c0392b"

_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.muted{color:#777}.small{font-size:12px}
table{border-collapse:collapse;background:#fff;margin:4px 0 12px;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.zero td{color:#aaa}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;color:#fff;font-size:11px;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}.plots{display:flex;flex-wrap:wrap;gap:12px}
.plots figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}
.plots img{display:block;width:480px;height:auto}ul.notes li{margin:3px 0}
code{background:#f0f0f0;padding:0 3px;border-radius:3px}a{color:#1f5fa8}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(path: str | None, folder: Path) -> str | None:
    if not path:
        return None
    if "://" in path:  # an object in object storage: linked by its URL
        return path
    try:
        relative = os.path.relpath(path, folder)
    except ValueError:  # another drive (Windows): an absolute file URI
        return Path(path).resolve().as_uri()
    return quote(Path(relative).as_posix())


def _link(label: str, path: str | None, folder: Path) -> str:
    href = _href(path, folder)
    return f'<a href="{_esc(href)}">{_esc(label)}</a>' if href else _esc(label)


def _figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingDependencyError("matplotlib", "The HTML report's plots", extra="inspect") from error
    figure = Figure(figsize=(6.4, 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot(title: str, draw: Callable[[Any], None]) -> str:
    figure = _figure()
    axes = figure.add_subplot()
    draw(axes)
    axes.set_title(title, fontsize=11)
    axes.grid(alpha=0.3)
    return (f'<figure><img alt="{_esc(title)}" src="data:image/png;base64,{_png(figure)}"></figure>')


def _plain_log_axis(axis, values: list[float]) -> None:
    """Log scale with readable ticks (0.5, 1, 2 rather than 5x10^-1)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    low, high = (min(values), max(values)) if values else (1.0, 1.0)
    candidates = [base * 10.0**exponent for exponent in range(-3, 6) for base in (1, 2, 5)]
    candidates += [0.25, 0.75, 1.5, 3, 4]
    ticks = sorted(tick for tick in set(candidates) if low / 1.5 <= tick <= high * 1.5)
    if len(ticks) > 9:
        ticks = ticks[:: math.ceil(len(ticks) / 9)]
    axis.set_major_locator(FixedLocator(ticks or [1.0]))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _histogram(values: list[float], limits: list[tuple[float, str]], xlabel: str, log_x: bool = False):
    def draw(axes) -> None:
        data = [value for value in values if value > 0] if log_x else values
        if log_x and data:
            low, high = min(data), max(data)
            bins = ([low * (high / low) ** (i / 40) for i in range(41)] if high > low
                    else [low / 1.05, low * 1.05])
            axes.set_xscale("log")
            _plain_log_axis(axes.xaxis, data + [value for value, _ in limits])
        else:
            bins = min(60, max(5, int(math.sqrt(len(data))) + 1)) if data else 10
        axes.hist(data, bins=bins, color=_BAR)
        for value, label in limits:
            axes.axvline(value, color=_LIMIT, linestyle="--", linewidth=1.2, label=label)
        if limits:
            axes.legend(fontsize=8)
        axes.set_xlabel(xlabel)
        axes.set_ylabel("images")

    return draw


def _plots(report: InspectionReport) -> dict[str, list[str]]:
    series = report.series
    settings = report.settings
    groups: dict[str, list[str]] = {"Captions": [], "Images": [], "Tags": []}
    if series.get("clip_tokens"):
        groups["Captions"].append(_plot("Caption length, CLIP tokens", _histogram(
            series["clip_tokens"], [(settings["clip_limit"], f"CLIP limit {settings['clip_limit']}")], "tokens")))
    if series.get("t5_tokens"):
        groups["Captions"].append(_plot("Caption length, T5 tokens", _histogram(
            series["t5_tokens"], [(256, "256"), (512, "512")], "tokens")))
    if series.get("width"):
        def scatter(axes) -> None:
            axes.scatter(series["width"], series["height"], s=18, alpha=0.4, color=_BAR, edgecolors="none")
            width, height = (int(part) for part in settings["resolution"].split("x"))
            axes.axvline(width, color=_LIMIT, linestyle="--", linewidth=1)
            axes.axhline(height, color=_LIMIT, linestyle="--", linewidth=1, label=f"target {settings['resolution']}")
            axes.set_xscale("log")
            axes.set_yscale("log")
            _plain_log_axis(axes.xaxis, series["width"] + [width])
            _plain_log_axis(axes.yaxis, series["height"] + [height])
            axes.set_xlabel("width (px)")
            axes.set_ylabel("height (px)")
            axes.legend(fontsize=8)

        groups["Images"].append(_plot("Resolutions", scatter))
        groups["Images"].append(_plot("Aspect ratio (width / height)", _histogram(
            series["aspect_ratio"], [(1.0, "square")], "width / height (log scale)", log_x=True)))
        groups["Images"].append(_plot("Resize factor into the bucket", _histogram(
            series["scale"], [(1.0, "above: upscaled")], "scale (log scale)", log_x=True)))
        buckets = sorted(series["buckets"], key=lambda item: -item[1])[:24]

        def bucket_bars(axes) -> None:
            names = [name for name, _ in buckets][::-1]
            axes.barh(names, [count for _, count in buckets][::-1], color=_BAR)
            axes.set_xlabel("images")
            axes.tick_params(axis="y", labelsize=7)

        groups["Images"].append(_plot(f"Buckets at {settings['resolution']}", bucket_bars))
    frequency = report.stats.get("tags", {}).get("frequency") or {}
    if frequency:
        top = list(frequency.items())[:25]

        def top_tags(axes) -> None:
            axes.barh([name for name, _ in top][::-1], [count for _, count in top][::-1], color=_BAR)
            axes.set_xlabel("images")
            axes.tick_params(axis="y", labelsize=7)

        groups["Tags"].append(_plot("Most frequent tags", top_tags))
        counts = list(frequency.values())

        def long_tail(axes) -> None:
            axes.plot(range(1, len(counts) + 1), counts, color=_BAR, marker="." if len(counts) < 200 else None)
            axes.axhline(settings["min_count"], color=_LIMIT, linestyle="--", linewidth=1.2,
                         label=f"--min-count {settings['min_count']}")
            axes.set_xscale("log")
            axes.set_yscale("log")
            _plain_log_axis(axes.xaxis, [1, len(counts)])
            _plain_log_axis(axes.yaxis, counts + [settings["min_count"]])
            axes.set_xlabel("tag rank")
            axes.set_ylabel("images")
            axes.legend(fontsize=8)

        groups["Tags"].append(_plot("Tag frequency by rank (long tail)", long_tail))
    categories = series.get("categories")
    if categories:
        def category_bars(axes) -> None:
            names = list(categories)
            axes.bar(names, [categories[name]["occurrences"] for name in names], color=_BAR)
            axes.set_ylabel("tag occurrences")

        groups["Tags"].append(_plot("Tags per category", category_bars))
    return groups


def _details(finding: Finding, report: InspectionReport, folder: Path) -> str:
    parts = []
    if len(finding.files) > 1:
        shown = finding.files[:20]
        links = ", ".join(_link(name, report.paths.get(name), folder) for name in shown)
        more = f" … and {len(finding.files) - len(shown)} more" if len(finding.files) > len(shown) else ""
        parts.append(f"files: {links}{more}")
    for key, value in finding.details.items():
        if key in ("other", "other_path", "caption_file", "error", "missing_from") or value is None:
            continue
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        parts.append(f"<span class=muted>{_esc(key)}:</span> {_esc(value)}")
    if finding.details.get("caption_file"):
        path = finding.details["caption_file"]
        parts.append("caption file: " + _link(Path(path).name, path, folder))
    return "<br>".join(parts)


def _badge(severity: str) -> str:
    return f'<span class="badge" style="background:{_COLOURS[severity]}">{severity}</span>'


def render_html(report: InspectionReport, folder: Path, rows_per_kind: int = ROWS_PER_KIND) -> str:
    """The report as one HTML document; links are relative to ``folder`` (where the file will be)."""
    summary = report.summary()
    counts = report.counts
    out = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
           f"<title>captionkit inspect: {_esc(report.dataset)}</title><style>{_CSS}</style></head><body>",
           f"<h1>captionkit inspect: {_esc(report.dataset)}</h1>",
           f"<div class='muted small'>{_esc(report.source)} · root {_esc(report.root)} · {_esc(report.generated_at)}"
           f" · {report.elapsed_s:.1f}s · mode {_esc(report.settings['mode'])} · target "
           f"{_esc(report.settings['resolution'])}</div>"]
    total_errors = sum(1 for f in report.findings if f.severity == "error")
    total_warnings = sum(1 for f in report.findings if f.severity == "warning")
    cards = [("images", counts["images"]), ("readable", counts["readable_images"]),
             ("with caption", counts["with_caption"]), ("tagged", counts["tagged"]),
             ("errors", total_errors), ("warnings", total_warnings)]
    out.append("<div class=cards>" + "".join(f"<div class=card><b>{value}</b>{_esc(label)}</div>"
                                             for label, value in cards) + "</div>")
    out.append("<h2>Summary</h2><table><tr><th>Check</th><th>Severity</th><th>Found</th><th>Why it matters</th></tr>")
    for name, kind in KINDS.items():
        found = summary[name]
        label = f'<a href="#{name}">{_esc(kind.title)}</a>' if found else _esc(kind.title)
        out.append(f"<tr class='{'zero' if not found else ''}'><td>{label}<br><code class=small>{name}</code></td>"
                   f"<td>{_badge(kind.severity)}</td><td class=num>{found}</td><td>{_esc(kind.why)}</td></tr>")
    out.append("</table>")
    out.append("<h2>Notes</h2><ul class=notes>" + "".join(f"<li>{_esc(note)}</li>" for note in report.notes)
               + "</ul>")
    out.append(_stats_tables(report))
    for group, figures in _plots(report).items():
        if figures:
            out.append(f"<h2>{group}: plots</h2><div class=plots>{''.join(figures)}</div>")
    out.append("<h2>Findings</h2>")
    if not report.findings:
        out.append("<p>No findings: nothing here would spoil a training run.</p>")
    for name, kind in KINDS.items():
        findings = report.by_kind(name)
        if not findings:
            continue
        out.append(f"<h3 id='{name}'>{_badge(kind.severity)} {_esc(kind.title)} ({len(findings)})</h3>"
                   f"<div class='muted small'>{_esc(kind.why)}</div>")
        out.append("<table><tr><th>File</th><th>Finding</th><th>Details</th></tr>")
        for finding in findings[:rows_per_kind]:
            out.append(f"<tr><td>{_link(finding.file, finding.path, folder)}</td><td>{_esc(finding.message)}</td>"
                       f"<td class=small>{_details(finding, report, folder)}</td></tr>")
        out.append("</table>")
        if len(findings) > rows_per_kind:
            out.append(f"<p class=muted>… and {len(findings) - rows_per_kind} more: see the JSON report.</p>")
    out.append("</body></html>")
    return "\n".join(out)


def _stats_tables(report: InspectionReport) -> str:
    stats = report.stats
    rows = []
    clip = stats["captions"].get("clip_tokens") or {}
    if clip.get("count"):
        rows.append(("CLIP tokens (median / p95 / max)", f"{clip['median']} / {clip['p95']} / {clip['max']}; "
                                                          f"{clip['over_limit']} over {clip['limit']}"))
    t5 = stats["captions"].get("t5_tokens")
    if t5 and t5.get("count"):
        rows.append(("T5 tokens (median / p95 / max)", f"{t5['median']} / {t5['p95']} / {t5['max']}; "
                                                        f"{t5['over_256']} over 256, {t5['over_512']} over 512"))
    sources = stats["captions"].get("sources") or {}
    if sources:
        rows.append(("Caption sources", ", ".join(f"{key}: {value}" for key, value in sources.items())))
    images = stats["images"]
    if images.get("readable"):
        rows.append(("Width (median / min / max)", f"{images['width']['median']} / {images['width']['min']} / "
                                                    f"{images['width']['max']}"))
        rows.append(("Height (median / min / max)", f"{images['height']['median']} / {images['height']['min']} / "
                                                     f"{images['height']['max']}"))
        rows.append(("Formats", ", ".join(f"{key}: {value}" for key, value in images["formats"].items())))
        buckets = images["buckets"]
        rows.append(("Buckets", f"{len(buckets['counts'])} of {buckets['available']} used at "
                                f"{buckets['resolution']} (sides {buckets['min']}-{buckets['max']}, step "
                                f"{buckets['step']}); {images['upscaled']} images upscaled"))
    tags = stats["tags"]
    if tags.get("tagged_images"):
        tail = tags["long_tail"]
        rows.append(("Tags", f"{tags['distinct_tags']} distinct, {tags['occurrences']} on {tags['tagged_images']} "
                             f"images (median {tags['per_image']['median']} per image)"))
        rows.append(("Long tail", f"{tail['tags_below']} tags below --min-count {tail['min_count']} "
                                  f"({tail['occurrences_below']} occurrences)"))
        if tags.get("categories"):
            rows.append(("Per category", "; ".join(f"{name}: {value['tags']} tags, {value['occurrences']} uses"
                                                   for name, value in tags["categories"].items())))
    if not rows:
        return ""
    return ("<h2>Statistics</h2><table>" + "".join(f"<tr><th>{_esc(label)}</th><td>{_esc(value)}</td></tr>"
                                                   for label, value in rows) + "</table>")
