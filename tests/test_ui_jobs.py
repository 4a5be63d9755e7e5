"""The web UI's job manager: one worker, a queue (or refusal), Stop within a batch, progress any page reads,
and one resident model (a switch frees the previous one). No browser and no gradio needed."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import pytest

from captionkit.core.errors import CaptionkitError
from captionkit.ui import forms, tasks
from captionkit.ui.jobs import JobManager, JobRefused
from tests.images import write_good_images


def caption_options(model: Path, **values):
    raw = {"model": str(model), "num_beams": "1", "max_new_tokens": "6", **values}
    return forms.caption_call(forms.parse_values(forms.caption_fields(), raw))


@pytest.fixture
def manager(tmp_path):
    jobs = JobManager(log_file=tmp_path / "ui.log")
    yield jobs
    jobs.shutdown()


def blocking_job(release: threading.Event):
    def work(job):
        job.set_phase("holding the worker")
        release.wait(30)
        return "released"

    return work


def started(job, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while job.state == "queued" and time.monotonic() < deadline:
        time.sleep(0.005)
    return job.state == "running"


def test_a_second_job_waits_in_the_queue_and_runs_after_the_first(manager):
    release = threading.Event()
    first = manager.submit("caption", "first", blocking_job(release))
    second = manager.submit("caption", "second", lambda job: "ran")
    assert started(first)
    assert second.state == "queued"
    assert "waits for first" in second.snapshot()["phase"]
    release.set()
    assert manager.wait(second, 10)
    assert first.state == "done" and second.state == "done" and second.message == "ran"
    assert first.finished <= second.started  # never two at once


def test_a_full_queue_refuses_with_a_message_naming_the_running_job(tmp_path):
    manager = JobManager(max_queued=0, log_file=tmp_path / "ui.log")
    release = threading.Event()
    try:
        assert started(manager.submit("caption", "caption photos with big-model", blocking_job(release)))
        with pytest.raises(JobRefused, match="caption photos with big-model is running"):
            manager.submit("tag", "tag photos", lambda job: None)
        release.set()
        assert manager.wait_idle(10)
        assert manager.submit("tag", "tag photos", lambda job: "ok")  # accepted once the worker is free
    finally:
        release.set()
        manager.shutdown()


def test_stopping_a_queued_job_cancels_it_without_running(manager):
    release = threading.Event()
    manager.submit("caption", "first", blocking_job(release))
    ran = []
    queued = manager.submit("caption", "second", lambda job: ran.append(1))
    manager.stop(queued.id)
    release.set()
    assert manager.wait_idle(10)
    assert queued.state == "cancelled" and not ran


def test_errors_become_one_sentence_and_the_traceback_goes_to_the_log_file(manager):
    def broken(job):
        raise RuntimeError("tensor shapes do not match\nline two of a long message")

    def plain(job):
        raise CaptionkitError("/data/photos: no such file or folder. Check the path.")

    first = manager.submit("caption", "broken", broken)
    second = manager.submit("caption", "plain", plain)
    assert manager.wait(second, 10)
    assert first.state == "failed" and "\n" not in first.message and "Traceback" not in first.message
    assert "RuntimeError: tensor shapes do not match" in first.message and str(manager.log_file) in first.message
    assert "Traceback" in manager.log_file.read_text()
    assert second.message == "/data/photos: no such file or folder. Check the path."
    oom = manager.submit("caption", "oom", lambda job: (_ for _ in ()).throw(RuntimeError("CUDA out of memory.")))
    assert manager.wait(oom, 10) and oom.message.startswith("Out of memory") and "batch size" in oom.message


def test_stop_ends_a_caption_job_within_a_batch_with_many_decode_workers_and_the_next_run_resumes(
        tmp_path, tiny_florence):
    folder = tmp_path / "photos"
    write_good_images(folder, 40)
    batch_time = 0.15

    def slow_florence(options):
        from captionkit import api

        backend = api.build_captioner(options=options)
        original = backend.caption_batch

        def caption_batch(requests):
            time.sleep(batch_time)
            return original(requests)

        backend.caption_batch = caption_batch
        return backend

    manager = JobManager(log_file=tmp_path / "ui.log", builder=slow_florence)
    try:
        options, run = caption_options(tiny_florence, batch_size="2", workers=8)
        job = tasks.submit_caption(manager, str(folder), options, run)
        deadline = time.monotonic() + 60
        while not (job.snapshot()["progress"].get("done") or 0) and time.monotonic() < deadline:
            time.sleep(0.005)
        seen = job.snapshot()["progress"]["done"]
        asked = time.monotonic()
        manager.stop()
        assert manager.wait(job, 30)
        stopped_after = time.monotonic() - asked
        summary = job.result
        assert job.state == "stopped" and summary["interrupted"]
        # the batch on the model and the one being saved finish; nothing after them starts
        assert seen <= summary["processed"] <= seen + 2 * 2 < 40
        assert stopped_after < 4 * batch_time + 1.0, f"took {stopped_after:.2f}s to stop"
        assert len(list(folder.glob("*.txt"))) == summary["processed"]  # finished work is kept
        again = tasks.submit_caption(manager, str(folder), options, run)
        assert manager.wait(again, 60) and again.state == "done"
        assert again.result["reused"] == summary["processed"] and again.result["processed"] == 40 - summary["processed"]
        assert manager.models.loads == 1  # the same resident model served both runs
    finally:
        manager.shutdown()


def test_a_second_page_sees_the_same_jobs_progress(tmp_path, tiny_florence, manager):
    folder = tmp_path / "photos"
    write_good_images(folder, 12)
    options, run = caption_options(tiny_florence, batch_size="2")
    job = tasks.submit_caption(manager, str(folder), options, run)
    pages: dict[str, list] = {"one": [], "two": []}

    def page(name):  # what each open browser tab's timer does: read the latest job
        while True:
            snapshot = manager.latest().snapshot()
            pages[name].append((snapshot["id"], snapshot["progress"].get("done")))
            if snapshot["finished"]:
                return
            time.sleep(0.002)

    threads = [threading.Thread(target=page, args=(name,)) for name in pages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for seen in pages.values():
        assert {job_id for job_id, _ in seen} == {job.id}
        assert seen[-1][1] == 12
    assert job.state == "done" and "12 done" in job.message


def _rss_bytes() -> int:
    """Resident memory after returning freed heap pages to the system: what is still held, not the allocator's
    cache (which depends on what other tests ran in this worker before)."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS as it is
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_switching_models_unloads_the_previous_one_and_frees_its_memory(tmp_path):
    from captionkit.testing.vlms.llava import build_llava

    folder = tmp_path / "photos"
    write_good_images(folder, 2)
    models = [build_llava(tmp_path / f"llava-{seed}", hidden=512, layers=4, seed=seed) for seed in (0, 1)]
    weights = sum(path.stat().st_size for path in models[0].glob("*.safetensors"))
    manager = JobManager(log_file=tmp_path / "ui.log")

    def run_with(model: Path):
        # bf16: every load is a real copy (fp32 weights would stay memory-mapped and a leak would barely show)
        options, run = caption_options(model, num_beams="", prompt="Hi", max_new_tokens="2", dtype="bf16",
                                       existing="overwrite")
        job = tasks.submit_caption(manager, str(folder), options, run)
        assert manager.wait(job, 120) and job.state == "done", job.message
        return weakref.ref(manager.models.backend.model)

    try:
        previous = run_with(models[0])
        run_with(models[1])
        gc.collect()
        baseline = _rss_bytes()
        for index in range(6):
            resident = run_with(models[index % 2])
            gc.collect()
            assert previous() is None, "the previous model is still referenced after the switch"
            previous = resident
        grown = _rss_bytes() - baseline
        # measured here: +2 MB when each switch frees the model; +182 MB when the old backends are kept
        assert grown < 2 * weights, f"RSS grew {grown / 1e6:.1f} MB over six switches of {weights / 1e6:.1f} MB models"
        assert manager.models.loads == 8 and manager.models.unloads == 7
    finally:
        manager.shutdown()
    assert manager.models.backend is None and previous() is None  # shutdown frees the last one too


def test_model_not_found_and_a_missing_extra_are_plain_sentences(tmp_path, manager):
    from captionkit.core.errors import MissingDependencyError
    from captionkit.ui.jobs import plain_error

    folder = tmp_path / "photos"
    write_good_images(folder, 2)
    options, run = caption_options(tmp_path / "no-such-model")
    job = tasks.submit_caption(manager, str(folder), options, run)
    assert manager.wait(job, 30) and job.state == "failed"
    assert job.message == f"{tmp_path / 'no-such-model'}: no such model folder. Check the path."
    assert manager.models.backend is None
    missing = MissingDependencyError("accelerate", "captionkit train captioner", extra="train")
    assert plain_error(missing).endswith("Run: pip install 'captionkit[train]'")
    with pytest.raises(CaptionkitError, match="no such file or folder"):  # refused before it is queued
        tasks.submit_caption(manager, str(tmp_path / "missing"), options, run)


def test_a_pipeline_plans_and_runs_step_by_step(tmp_path, tiny_florence, manager):
    import yaml

    write_good_images(tmp_path / "images", 3)
    steps = [{"type": "captioner", "name": "florence",
              "config": {"model": str(tiny_florence), "num_beams": 1, "max_new_tokens": 6}},
             {"type": "template", "name": "final", "config": {"template": "ohwx, {florence}"}}]
    file = tmp_path / "p.yaml"
    file.write_text(yaml.safe_dump({"input": str(tmp_path / "images"), "base_folder": str(tmp_path / "work"),
                                    "save_folder": str(tmp_path / "out"), "steps": steps}, sort_keys=False))
    plan = tasks.pipeline_plan(str(file))
    assert [(row["name"], row["done"], row["to run"]) for row in plan] == [("florence", 0, 3), ("final", 0, 3)]
    job = tasks.submit_pipeline(manager, str(file), only_step="florence")
    assert manager.wait(job, 60) and job.state == "done", job.message
    assert "step 1 florence: 3 done" in job.message and "final" not in job.message.split(";")[0]
    plan = tasks.pipeline_plan(str(file))
    assert [(row["name"], row["done"], row["to run"]) for row in plan] == [("florence", 3, 0), ("final", 0, 3)]
    job = tasks.submit_pipeline(manager, str(file), only_step="final")
    assert manager.wait(job, 60) and job.state == "done"
    assert [row["to run"] for row in tasks.pipeline_plan(str(file))] == [0, 0]
    file.write_text("input: images\nsteps: [{type: captionr}]\n")
    with pytest.raises(CaptionkitError, match="captionr"):  # validation errors show before queueing
        tasks.submit_pipeline(manager, str(file))


def test_a_caption_job_with_a_local_model_folder_names_that_folder_in_its_log_and_run_log(
        tmp_path, tiny_florence, manager):
    folder = tmp_path / "photos"
    write_good_images(folder, 3)
    options, run = caption_options(tiny_florence, task="<DETAILED_CAPTION>")
    job = tasks.submit_caption(manager, str(folder), options, run)
    assert manager.wait(job, 60) and job.state == "done", job.message
    run_log = (folder / ".captionkit" / "run.log").read_text()
    for text in ("\n".join(job.snapshot()["log"]), run_log):
        assert f"model {tiny_florence}, task <DETAILED_CAPTION>" in text, text
        assert "Florence-2-base" not in text, text


def test_the_job_log_has_readable_lines_not_python_dicts(tmp_path, tiny_florence, manager):
    import yaml

    folder = tmp_path / "photos"
    write_good_images(folder, 3)
    options, run = caption_options(tiny_florence)
    job = tasks.submit_caption(manager, str(folder), options, run)
    assert manager.wait(job, 60) and job.state == "done", job.message
    lines = job.snapshot()["log"]
    assert not [line for line in lines if "{" in line or "'processed'" in line], lines
    assert sum("caption: 3 done, 0 already done" in line for line in lines) == 2, lines  # the summary, then done
    steps = [{"type": "captioner", "name": "florence",
              "config": {"model": str(tiny_florence), "num_beams": 1, "max_new_tokens": 6}}]
    file = tmp_path / "p.yaml"
    file.write_text(yaml.safe_dump({"input": str(folder), "base_folder": str(tmp_path / "work"), "steps": steps}))
    job = tasks.submit_pipeline(manager, str(file))
    assert manager.wait(job, 60) and job.state == "done", job.message
    lines = job.snapshot()["log"]
    assert not [line for line in lines if "{" in line], lines
    assert any("step 1 (florence): 3 done, 0 already done, 0 failed in " in line for line in lines), lines


def test_stop_button_eta_and_stop_message_follow_the_job(tmp_path, manager):
    """What each page's timer shows: Stop red only while a job runs, no ETA once it stops, the
    "Stopping" line only until the job has ended."""
    pytest.importorskip("gradio")
    from captionkit.ui.app import App

    app = App(manager)
    status, _, button, message = app.refresh_status()
    assert button["variant"] != "stop" and button["interactive"] is False and message == ""
    release = threading.Event()

    def work(job):
        job.on_event({"event": "start", "total": 10})
        job.on_event({"event": "progress", "done": 4, "failed": 0, "total": 10, "current": "img003.png",
                      "images_per_s": 2.0, "eta_s": 3.0})
        release.wait(30)
        return {"interrupted": True}

    job = manager.submit("caption", "caption photos", work)
    deadline = time.monotonic() + 10
    while "4 / 10" not in app.refresh_status()[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    status, _, button, message = app.refresh_status()
    assert "ETA 0:03" in status and button["variant"] == "stop" and button["interactive"] is True
    assert message == ""
    status, _, button, message = app.stop_job()  # the page's Stop button: the panel it shows at once
    assert 'data-state="stopping"' in status and "Stopping: caption photos" in message
    status, _, button, message = app.refresh_status()
    assert 'data-state="stopping"' in status and "ETA" not in status
    assert "Stopping: caption photos" in message and button["interactive"] is False and button["variant"] != "stop"
    release.set()
    assert manager.wait(job, 10) and job.state == "stopped"
    status, _, button, message = app.refresh_status()
    assert 'data-state="stopped"' in status and "4 / 10 images" in status and "ETA" not in status
    assert message == "" and button["interactive"] is False and button["variant"] != "stop"
    assert "No job is running" in app.stop_job()[3]


def test_the_job_summary_names_why_the_circuit_breaker_stopped_the_run():
    from captionkit.executors.local import RunSummary
    from captionkit.ui.jobs import summary_line

    reason = "Stopped early after 8 images in a row failed: connection refused."
    summary = RunSummary(field="caption", total=1000, failed=8, interrupted=True, stopped_early=reason)
    assert summary_line(summary.as_dict()).endswith("; " + reason)
    summary.stopped_early = None  # Ctrl-C or the Stop button: the generic sentence
    assert "start again to continue" in summary_line(summary.as_dict())
