"""The CPU-thread tuner: measures before it decides, and only when decoding competes with the model."""

from captionkit.core.thread_tuning import DecodeWorkerTuner, ThreadTuner


def _run(tuner: ThreadTuner, seconds_per_image: dict[int, float], decode_share: float, batches: int = 8):
    applied = []
    current = [tuner.candidates[0]]

    def apply(threads):
        applied.append(threads)
        current[0] = threads

    tuner.apply = apply
    for _ in range(batches):
        tuner.before_batch()
        per_image = seconds_per_image[current[0]]
        tuner.after_batch(8, 8 * per_image, 8 * per_image, decode_share * per_image)
    return applied


def test_picks_the_faster_thread_count_when_decoding_competes():
    tuner = ThreadTuner([2, 1], lambda threads: None)
    applied = _run(tuner, {2: 0.009, 1: 0.004}, decode_share=0.5)
    assert tuner.done and tuner.chosen == 1 and applied[-1] == 1


def test_keeps_all_threads_when_they_are_faster():
    tuner = ThreadTuner([2, 1], lambda threads: None)
    _run(tuner, {2: 0.1, 1: 0.19}, decode_share=0.5)
    assert tuner.chosen == 2


def test_does_not_experiment_when_decoding_is_negligible():
    tuner = ThreadTuner([2, 1], lambda threads: None)
    applied = _run(tuner, {2: 5.0, 1: 9.0}, decode_share=0.01)
    assert tuner.done and tuner.chosen == 2 and applied == []


def test_nothing_to_tune_off_the_cpu():
    tuner = ThreadTuner([], lambda threads: None)
    assert tuner.done and tuner.chosen is None


# decode workers ---------------------------------------------------------------------------------
def _feed(tuner: DecodeWorkerTuner, decode_s_per_image: float, model_s_per_image: float, batches: int = 40,
          starved: bool = False) -> list[int]:
    """Batches of 8 decoded at the tuner's current count (the first after a change still at the old one)."""
    applied: list[int] = []
    tuner.apply = applied.append
    decoded_at = tuner.current
    for _ in range(batches):
        wall = 8 * model_s_per_image * (2 if starved else 1)
        tuner.after_batch(8, wall, 8 * model_s_per_image, 8 * decode_s_per_image, wall / 2 if starved else 0.0,
                          {decoded_at})
        decoded_at = tuner.current  # a change shows in the batches decoded after it
    return applied


def test_decode_workers_follow_the_measured_rates():
    slow_decode = DecodeWorkerTuner(limit=16, apply=lambda workers: None)
    _feed(slow_decode, decode_s_per_image=0.050, model_s_per_image=0.010)  # 5 workers' worth, with headroom 7
    assert slow_decode.done and slow_decode.current == 7
    fast_decode = DecodeWorkerTuner(limit=16, apply=lambda workers: None)
    applied = _feed(fast_decode, decode_s_per_image=0.002, model_s_per_image=0.050)
    assert fast_decode.done and fast_decode.current == 1 and applied == [1]


def test_decode_workers_stay_within_the_limit_and_grow_when_the_model_waits():
    capped = DecodeWorkerTuner(limit=2, apply=lambda workers: None)
    _feed(capped, decode_s_per_image=0.5, model_s_per_image=0.001, batches=200)
    assert capped.done and capped.current == 2
    waiting = DecodeWorkerTuner(limit=16, apply=lambda workers: None, start=3)
    applied = _feed(waiting, decode_s_per_image=0.010, model_s_per_image=0.010, starved=True, batches=5)
    assert applied[:1] == [4]  # the formula says 2 (with headroom), but the model waited at 3


def _feed_rates(tuner: DecodeWorkerTuner, seconds_per_image: dict[int, float], batches: int = 40) -> list[int]:
    """Batches whose wall time depends on the worker count they were decoded at (decode 12 ms per image per
    worker, model 10 ms: the formula asks for 2 workers)."""
    applied: list[int] = []
    tuner.apply = applied.append
    decoded_at = tuner.current
    for _ in range(batches):
        tuner.after_batch(8, 8 * seconds_per_image[decoded_at], 8 * 0.010, 8 * 0.012, 0.0, {decoded_at})
        decoded_at = tuner.current
    return applied


def test_one_decode_worker_fewer_is_measured_and_kept_only_when_faster():
    shared_cores = DecodeWorkerTuner(limit=2, apply=lambda workers: None)  # a decode thread slows the model
    applied = _feed_rates(shared_cores, {1: 0.0075, 2: 0.0080})
    assert shared_cores.done and shared_cores.current == 1 and applied == [1]
    spare_cores = DecodeWorkerTuner(limit=2, apply=lambda workers: None)  # the second worker pays for itself
    applied = _feed_rates(spare_cores, {1: 0.0120, 2: 0.0080})
    assert spare_cores.done and spare_cores.current == 2 and applied == [1, 2]
    noise = DecodeWorkerTuner(limit=2, apply=lambda workers: None)  # 1% apart: the formula's count stays
    _feed_rates(noise, {1: 0.00792, 2: 0.0080})
    assert noise.done and noise.current == 2


def test_decode_workers_ignore_batches_decoded_at_another_count():
    tuner = DecodeWorkerTuner(limit=16, apply=lambda workers: None, start=4)
    for _ in range(10):
        tuner.after_batch(8, 1.0, 1.0, 0.001, 0.0, {2, 4})
    assert not tuner.done and tuner.current == 4


def test_a_fast_model_is_measured_for_half_a_second_not_two_batches():
    """Two batches of a 1 ms-per-image model last 16 ms: too short to tell two worker counts apart."""
    tuner = DecodeWorkerTuner(limit=16, apply=lambda workers: None, start=4)
    applied = _feed(tuner, decode_s_per_image=0.010, model_s_per_image=0.001, batches=20)
    assert applied == []  # 19 measured batches: 0.15 s, still measuring the first setting
    applied = _feed(tuner, decode_s_per_image=0.010, model_s_per_image=0.001, batches=60)
    assert applied[:1] == [13]  # then the formula's count: 10 ms / 1 ms x 1.25, capped at the limit


def test_started_at_one_worker_a_second_is_kept_only_when_measured_faster():
    """A model on the CPU starts at one decode worker; where the formula asks for two, two are measured and kept
    only when faster than the one already measured."""
    shared_cores = DecodeWorkerTuner(limit=2, apply=lambda workers: None, start=1)
    applied = _feed_rates(shared_cores, {1: 0.0075, 2: 0.0080})
    assert shared_cores.done and shared_cores.current == 1 and applied == [2, 1]
    spare_cores = DecodeWorkerTuner(limit=2, apply=lambda workers: None, start=1)
    applied = _feed_rates(spare_cores, {1: 0.0120, 2: 0.0080})
    assert spare_cores.done and spare_cores.current == 2 and applied == [2]
