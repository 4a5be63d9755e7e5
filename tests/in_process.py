"""The command line run in the test's own process: its exit code and output, without a fresh interpreter.

A fresh ``python -m captionkit.cli`` pays seconds of imports (torch, transformers) per run. Tests about
what a command does, not about the process (a kill, an interrupt, a clean interpreter), call the
console entry point ``captionkit.cli.main`` instead; its ``sys.exit`` code is the process's exit status.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path


def run_cli(*arguments: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            ) -> subprocess.CompletedProcess:
    """``captionkit ARGUMENTS`` through ``captionkit.cli.main``, with ``env`` as the whole environment and
    ``cwd`` as the working folder while it runs; both, ``sys.argv`` and the loggers main sets are put back after."""
    from captionkit.cli import main

    saved_environment, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    handlers = list(logging.getLogger().handlers)
    levels = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "huggingface_hub", "transformers")}
    stdout, stderr = io.StringIO(), io.StringIO()
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    sys.argv = ["captionkit", *arguments]
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_environment)
        for handler in logging.getLogger().handlers[:]:
            if handler not in handlers:  # main's own stderr handler, one per call
                logging.getLogger().removeHandler(handler)
        for name, level in levels.items():  # main quiets these; other tests may read their warnings
            logging.getLogger(name).setLevel(level)
    return subprocess.CompletedProcess([sys.executable, "-m", "captionkit.cli", *arguments], code,
                                       stdout.getvalue(), stderr.getvalue())
