"""Hooks for programs that drive captionkit (the web UI): progress events and a stop event."""

from __future__ import annotations

import threading

import captionkit
from tests.images import write_good_images


def test_listener_sees_progress_and_stop_ends_after_the_batch(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, 12)
    stop = threading.Event()
    events = []

    def listener(event):
        events.append(event)
        if event["event"] == "progress":
            stop.set()  # as if the user pressed Stop while the first batch was saved

    summary = captionkit.caption(folder, model=str(tiny_florence), num_beams=1, max_new_tokens=6, batch_size=2,
                                 workers=4, listener=listener, stop=stop)
    assert summary.interrupted and 2 <= summary.processed < 12
    assert events[0]["event"] == "start" and events[0]["total"] == 12
    progress = [event for event in events if event["event"] == "progress"]
    assert progress[0]["current"].startswith("img") and "images_per_s" in progress[0] and "eta_s" in progress[0]
    assert events[-1]["event"] == "summary" and events[-1]["interrupted"] is True
    again = captionkit.caption(folder, model=str(tiny_florence), num_beams=1, max_new_tokens=6, batch_size=2)
    assert again.reused == summary.processed and again.processed == 12 - summary.processed
