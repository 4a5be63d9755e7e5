"""The CPU-thread tuner: measures before it decides, and only when decoding competes with the model."""

from captionkit.core.thread_tuning import ThreadTuner


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
