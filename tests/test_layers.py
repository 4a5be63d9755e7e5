"""The architecture, checked: every import in the package points down a layer (or stays in its own).

Lazy imports inside functions count too: a circle hidden in a function body is still a circle.
The layers, bottom to top, are the ones README's "Architecture" section draws.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "captionkit"

# Bottom to top. A module may import its own layer and the layers below, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("captionkit._torchvision_compat", "captionkit.core")),
    ("models", ("captionkit.models",)),
    ("steps", ("captionkit.steps", "captionkit.options")),  # options: each command's declared options
    ("executors", ("captionkit.executors",)),
    ("work", ("captionkit.pipeline", "captionkit.inspection", "captionkit.train")),
    ("api", ("captionkit.api",)),
    ("ui", ("captionkit.ui",)),  # the web UI calls the api, never the command line
    ("cli", ("captionkit.cli", "captionkit.train.cli", "captionkit.train.captioner_cli",
             "captionkit.train.tagger_cli")),  # `captionkit ui` starts the UI
]
# Tiny-model builders for tests and benchmarks: they may use any layer; no product module may use them.
TESTING = "captionkit.testing"


def _layer(module: str) -> int | None:
    """The layer of a module: the longest matching prefix wins (train.cli is the command line, train a worker)."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from captionkit import api` names a module through its package
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if node.module == "captionkit"]
    return [(line, name) for line, name in found if name.startswith("captionkit.")]


def _violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if module == "captionkit":  # the package's own front door re-exports the api
            continue
        here = _layer(module)
        in_testing = module == TESTING or module.startswith(TESTING + ".")
        if here is None and not in_testing:
            problems.append(f"{module}: belongs to no layer (add it to LAYERS, or move it)")
            continue
        for line, name in _imports(path):
            if name == TESTING or name.startswith(TESTING + "."):
                if not in_testing:
                    problems.append(f"{module}:{line} imports the test builders {name}")
                continue
            if in_testing:
                continue
            there = _layer(name)
            if there is not None and there > here:
                problems.append(f"{module}:{line} ({LAYERS[here][0]}) imports {name} ({LAYERS[there][0]}), a layer up")
    return problems


def test_every_import_points_down_a_layer():
    assert _violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself can fail: a core module importing the api is reported."""
    fake = tmp_path / "captionkit"
    (fake / "core").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core" / "__init__.py").write_text("")
    (fake / "core" / "bad.py").write_text("def f():\n    from captionkit.api import caption\n")
    import sys

    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _violations() == ["captionkit.core.bad:2 (core) imports captionkit.api (api), a layer up"]
