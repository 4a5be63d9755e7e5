"""Problems named for what they are: a broken environment, a taken port, a missing input, a full disk.

Each test runs the real console entry point, in a fresh interpreter the way a user meets it where the
interpreter is part of the problem (a package that fails to import, a server that cannot start).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from captionkit.core.environment import describe_os_error
from tests.images import write_good_images

ROOT = Path(__file__).resolve().parent.parent


def _captionkit(args: list[str], cwd: Path, first_on_path: Path | None = None, timeout: int = 300,
                **env_values: str) -> subprocess.CompletedProcess:
    paths = [str(first_on_path)] if first_on_path else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([*paths, str(ROOT / "src")]),
           **env_values}
    return subprocess.run([sys.executable, "-m", "captionkit.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=lambda: os.umask(0o022))


def _broken_package(folder: Path, name: str, raise_line: str) -> Path:
    """An installed-looking package (with its dist-info) whose import fails, as one built for another torch does."""
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(raise_line + "\n")
    info = folder / f"{name}-99.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 99.0.0\n")
    (info / "top_level.txt").write_text(name + "\n")
    return folder


@pytest.mark.parametrize(("package", "raise_line", "model"), [
    # imported by transformers while the model loads (transformers.loss -> scipy.optimize)
    ("scipy", 'raise OSError("libscipy_core.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")', "llava"),
    ("scipy", 'raise ImportError("libc10.so: cannot open shared object file: No such file or directory")', "florence"),
    # imported by captionkit's torchvision repair before the model loads
    ("torchvision", 'raise OSError("libtorchvision.so: undefined symbol: _ZN2at4_ops")', "florence"),
])
def test_a_package_that_fails_to_import_is_named_not_the_model_folder_or_the_disk(
        tmp_path, tiny_florence, package, raise_line, model):
    from captionkit.testing.vlms.llava import build_llava

    folder = tiny_florence if model == "florence" else build_llava(tmp_path / "llava")
    write_good_images(tmp_path / "photos", 1)
    broken = _broken_package(tmp_path / "site", package, raise_line)
    args = ["caption", "photos", "--model", str(folder), *(["--prompt", "Hi"] if model == "llava" else [])]
    done = _captionkit(args, tmp_path, first_on_path=broken)
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error: the Python environment is broken: importing " + package), done.stderr[-3000:]
    assert str(broken / package) in message and f"pip install --force-reinstall {package}" in message
    for blame in ("not a loadable", "It needs config.json", "free space", "--output-dir", "Traceback"):
        assert blame not in done.stderr, done.stderr[-3000:]


def test_a_taken_port_is_one_sentence_and_exit_2(tmp_path):
    """`captionkit ui --port TAKEN`: the port is in use, pick another; no Gradio internals, no disk hint. Said
    before Gradio is imported (seconds of imports and building the app): a gradio that fails to import is
    first on the path here, and never reached."""
    if importlib.util.find_spec("gradio") is None:  # importorskip would import it here: seconds
        pytest.skip("gradio is not installed")
    broken = _broken_package(tmp_path / "site", "gradio", 'raise ImportError("gradio was imported")')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _captionkit(["ui", "--port", str(port)], tmp_path, first_on_path=broken)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == f"error: Port {port} on 127.0.0.1 is in use: pick another with --port.", done.stderr


@pytest.mark.parametrize("command", [["caption"], ["tag"], ["inspect"]])
def test_a_missing_input_is_named_before_any_model_is_looked_for(tmp_path, command):
    """The default models are not in this (empty) cache: the missing folder must be the error, not the model."""
    missing = tmp_path / "no" / "such" / "folder"
    done = _captionkit([*command, str(missing)], tmp_path, HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == f"error: {missing}: no such file or folder. Check the path."


def test_a_missing_pipeline_input_is_named_before_its_models(tmp_path):
    (tmp_path / "p.yaml").write_text("input: no-such-folder\nsteps:\n  - type: captioner\n    name: c\n"
                                     "    config: {model: florence-community/Florence-2-base}\n")
    done = _captionkit(["run", "p.yaml", "--dry-run"], tmp_path, HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    assert done.returncode == 2 and "no-such-folder does not exist" in done.stderr, done.stderr[-3000:]
    assert "Florence" not in done.stderr


@pytest.mark.parametrize(("number", "hint"), [
    (errno.ENOSPC, "Free some space, or write elsewhere with --output-dir."),
    (errno.EROFS, "Write elsewhere with --output-dir."),
    (errno.EACCES, "Check the permissions, or write elsewhere with --output-dir."),
    (errno.EEXIST, "Something is in the way there: move it, or write elsewhere with --output-dir."),
    (errno.ENOENT, None),
    (errno.EADDRINUSE, None),
    (None, None),
])
def test_the_disk_hint_is_given_only_for_errors_about_writing(number, hint):
    error = OSError(number, os.strerror(number)) if number else OSError("Cannot find empty port in range: 1-1.")
    text = describe_os_error(error)
    if hint is None:
        assert "space" not in text and "--output-dir" not in text and "permission" not in text.lower()
    else:
        assert text.endswith(hint)


def test_a_caption_run_writes_files_with_plain_modes(tmp_path, tiny_florence, monkeypatch):
    """Sidecars, the store, the run log and exports get what open() gives under umask 022 (0644; folders 0755).

    The console entry point in this process (a fresh interpreter's imports cost seconds): the umask is set
    for the run, and captionkit's copy of it, read once per process, is read again."""
    from captionkit.core import atomic
    from tests.in_process import run_cli

    write_good_images(tmp_path / "photos", 2)
    monkeypatch.setattr(atomic, "_umask", None)
    previous = os.umask(0o022)
    try:
        done = run_cli("caption", "photos", "--model", str(tiny_florence), "--num-beams", "1", "--max-new-tokens",
                       "4", "--export", "all.jsonl", "--export", "parts/", "--quiet", cwd=tmp_path)  # modes, not text
    finally:
        os.umask(previous)
    assert done.returncode == 0, done.stderr[-3000:]
    written = [path for path in tmp_path.rglob("*") if path.name != "photos" and not path.name.startswith("img0")
               or path.suffix == ".txt"]
    assert any(path.suffix == ".txt" for path in written) and (tmp_path / "all.jsonl").is_file()
    wrong = [f"{oct(stat.S_IMODE(path.stat().st_mode))} {path}" for path in written
             if stat.S_IMODE(path.stat().st_mode) != (0o755 if path.is_dir() else 0o644)]
    assert wrong == []
