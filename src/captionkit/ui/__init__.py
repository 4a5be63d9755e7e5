"""`captionkit ui`: a Gradio web UI over the library API (caption, tag, train, pipelines, review).

Gradio is an optional extra (``pip install 'captionkit[ui]'``); importing this package
does not import it. :func:`launch` starts the server; :mod:`captionkit.ui.jobs` (the
background job manager) and :mod:`captionkit.ui.dataset` (the Review tab's data) work
without Gradio.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from captionkit.core.errors import CaptionkitError

log = logging.getLogger("captionkit.ui")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """``USER:PASS``, or a file with one ``USER:PASS`` per line (blank lines and ``#`` comments skipped)."""
    if value is None or not value.strip():
        return None
    path = Path(value).expanduser()
    if path.is_file():
        pairs = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, separator, password = line.partition(":")
            if not separator or not user or not password:
                raise CaptionkitError(f"--auth {path}:{number}: write each line as USER:PASS.")
            pairs.append((user, password))
        if not pairs:
            raise CaptionkitError(f"--auth {path}: the file has no USER:PASS line.")
        return pairs
    user, separator, password = value.partition(":")
    if not separator or not user or not password:
        raise CaptionkitError("--auth: give USER:PASS, or a file with one USER:PASS per line.")
    return [(user, password)]


def exposure_warning(host: str, auth, share: bool) -> str | None:
    """The warning for a server others can reach without a password, else None."""
    if auth:
        return None
    if share:
        return ("--share puts this UI on a public gradio.live address without --auth: anyone with the link can "
                "read your folders and run jobs on this machine. Add --auth USER:PASS.")
    if host not in LOCAL_HOSTS:
        return (f"Listening on {host} without --auth: anyone who can reach this machine can read your folders and "
                "run jobs on it. Add --auth USER:PASS (or a file of them), or keep --host 127.0.0.1.")
    return None


def port_taken(host: str, port: int) -> bool:
    """True when something listens on ``host:port`` already (a bind fails with "address in use").

    Why: checked before Gradio is imported and the app built (seconds), so a taken --port is said at once;
    Gradio's own check stays behind it for a port taken in between. SO_REUSEADDR as the server sets it: a
    port only in TIME_WAIT after a previous run is free to it, only a listening one is not."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False  # a host it cannot resolve: the server's own start says so
    for family, kind, protocol, _, address in infos:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return True
    return False


def _port_in_use(host: str, port: int | None) -> CaptionkitError:
    """One sentence for a taken port, whether the early check or Gradio's own start found it."""
    taken = f"Port {port} on {host} is in use" if port else f"Ports 7860-7959 on {host} are all in use"
    return CaptionkitError(f"{taken}: pick another with --port.")


def launch(host: str = "127.0.0.1", port: int | None = None, auth: str | None = None, share: bool = False,
           block: bool = True, manager=None, quiet: bool = False):
    """Start the web UI; returns ``(blocks, app, url)`` when ``block`` is False (tests, notebooks)."""
    import os

    from captionkit.core.errors import require

    if port and port_taken(host, port):
        raise _port_in_use(host, port)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    require("gradio", "captionkit ui", extra="ui")
    from captionkit.ui.app import build_app, launch_options

    credentials = parse_auth(auth)
    warning = exposure_warning(host, credentials, share)
    if warning:
        log.warning("%s", warning)
    blocks, app = build_app(manager)
    try:
        _, url, share_url = blocks.launch(
            server_name=host, server_port=port, auth=credentials, share=share, prevent_thread_lock=True, quiet=True,
            show_error=False, **launch_options(),
        )
    except OSError as error:
        if "Cannot find empty port" not in str(error):
            raise
        raise _port_in_use(host, port) from error
    if not quiet:
        shown = url.replace("0.0.0.0", "127.0.0.1") if url else url
        print(f"captionkit ui: {shown}" + (f" (public link: {share_url})" if share_url else "") +
              " — Ctrl-C stops it; a running job stops after its current batch.", file=sys.stderr)
    if not block:
        return blocks, app, url
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        # Ctrl-C (or `kill -INT`) stops it even when it was started with SIGINT ignored, as a shell does for a
        # background job and some CI runners for their children; `captionkit caption` installs its own too
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while blocks.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("captionkit ui: stopping the running job after its current batch, then the server.", file=sys.stderr)
    finally:
        # the job first: closing the server waits up to 5 s for open pages, and the job must not run on meanwhile
        app.manager.close()
        blocks.close(verbose=False)
        app.manager.shutdown()
    return blocks, app, url


__all__ = ["exposure_warning", "launch", "parse_auth", "port_taken"]
