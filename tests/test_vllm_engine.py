"""The vLLM backend without vLLM: prompt formats, engine/sampling arguments, output parsing,
and the load → caption → unload glue against a fake ``vllm`` module."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from captionkit.core.errors import CaptionkitError, MissingDependencyError
from captionkit.models import get_backend
from captionkit.models.base import CaptionRequest, ChatSettings, ItemFailure
from captionkit.models.vllm_engine import (
    PROMPT_FORMATS,
    VLLMCaptioner,
    build_prompt,
    build_requests,
    engine_kwargs,
    parse_outputs,
    prompt_family,
    sampling_kwargs,
)

QUESTION = "Describe the red bicycle."


def model_folder(root: Path, model_type: str, **config) -> str:
    """A 'model' folder with only a config.json (all the backend reads before load)."""
    folder = root / f"model-{model_type}"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, **config}), encoding="utf-8")
    return str(folder)


LANGUAGE_MODELS = {"llava": {"text_config": {"model_type": "llama"}},
                   "llava_next": {"text_config": {"model_type": "mistral"}},
                   "blip-2": {"text_config": {"model_type": "opt"}}}


# prompt formats --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(PROMPT_FORMATS))
def test_every_family_has_one_image_placeholder_and_the_question(family):
    form = PROMPT_FORMATS[family]
    prompt = build_prompt(family, QUESTION, None)
    assert QUESTION in prompt
    assert build_prompt(family, f"  {QUESTION}\n", None) == prompt  # the question is stripped
    if form.placeholder:
        assert prompt.count(form.placeholder) == 1
        assert prompt.index(form.placeholder) < prompt.index(QUESTION)
    else:  # BLIP-2: vLLM puts the query tokens in front by itself
        assert "<image>" not in prompt
    # vLLM tokenizes with special tokens on: a literal BOS would be doubled
    assert "<|begin_of_text|>" not in prompt and "<bos>" not in prompt and not prompt.startswith("<s>")


@pytest.mark.parametrize("family", sorted(name for name, form in PROMPT_FORMATS.items() if form.system))
def test_system_prompt_comes_first_where_the_family_has_one(family):
    prompt = build_prompt(family, QUESTION, "You write alt text.")
    assert prompt.count("You write alt text.") == 1
    assert prompt.index("You write alt text.") < prompt.index(QUESTION)
    assert build_prompt(family, QUESTION, None) != prompt


@pytest.mark.parametrize("family", sorted(name for name, form in PROMPT_FORMATS.items() if not form.system))
def test_system_prompt_is_refused_where_the_family_has_none(family):
    with pytest.raises(CaptionkitError, match="--system-prompt"):
        build_prompt(family, QUESTION, "You write alt text.")


def test_formats_match_vllms_examples():
    q = QUESTION
    assert build_prompt("blip-2", q) == f"Question: {q} Answer:"
    assert build_prompt("llava", q) == f"USER: <image>\n{q}\nASSISTANT:"
    assert build_prompt("llava_next", q) == f"[INST] <image>\n{q} [/INST]"
    assert build_prompt("llava_onevision", q) == f"<|im_start|>user <image>\n{q}<|im_end|>\n<|im_start|>assistant\n"
    assert build_prompt("phi3_v", q) == f"<|user|>\n<|image_1|>\n{q}<|end|>\n<|assistant|>\n"
    qwen = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt("qwen2_vl", q) == qwen == build_prompt("qwen2_5_vl", q)
    assert build_prompt("mllama", q) == (
        f"<|start_header_id|>user<|end_header_id|>\n\n<|image|>{q}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert build_prompt("gemma3", q) == f"<start_of_turn>user\n<start_of_image>{q}<end_of_turn>\n<start_of_turn>model\n"
    assert build_prompt("idefics3", q) == f"User:<image>{q}<end_of_utterance>\nAssistant:"
    assert build_prompt("smolvlm", q) == f"<|im_start|>User:<image>{q}<end_of_utterance>\nAssistant:"
    assert build_prompt("qwen2_vl", q, "Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_family_comes_from_the_config_not_the_name():
    assert prompt_family({"model_type": "qwen2_5_vl"}, "llava-lookalike") == "qwen2_5_vl"
    assert prompt_family({"model_type": "idefics3", "text_config": {"vocab_size": 128259}}) == "idefics3"
    assert prompt_family({"model_type": "idefics3", "text_config": {"vocab_size": 49155}}) == "smolvlm"
    assert prompt_family({"model_type": "llava", "text_config": {"model_type": "llama"}}) == "llava"
    assert prompt_family({"model_type": "llava_next", "text_config": {"model_type": "mistral"}}) == "llava_next"


@pytest.mark.parametrize("config, words", [
    ({"model_type": "llava", "text_config": {"model_type": "qwen2"}}, "LLaVA-1.5"),
    ({"model_type": "llava_next", "text_config": {"model_type": "llama"}}, "Mistral format"),
    ({"model_type": "llava_next"}, "Mistral format"),
    ({"model_type": "blip-2", "text_config": {"model_type": "t5"}}, "OPT"),
])
def test_checkpoints_of_a_type_with_another_prompt_format_are_refused(config, words):
    with pytest.raises(CaptionkitError, match=words):
        prompt_family(config, "some/model")


def test_unknown_model_type_lists_the_supported_ones(tmp_path):
    with pytest.raises(CaptionkitError) as caught:
        VLLMCaptioner(model=model_folder(tmp_path, "florence2"))
    message = str(caught.value)
    assert "'florence2'" in message and "qwen2_vl" in message and "llava_onevision" in message
    with pytest.raises(CaptionkitError, match="supported model types"):
        build_prompt("bert", QUESTION)


def test_phi3_vision_needs_trust_remote_code(tmp_path):
    folder = model_folder(tmp_path, "phi3_v")
    with pytest.raises(CaptionkitError) as caught:
        VLLMCaptioner(model=folder)
    assert type(caught.value) is CaptionkitError
    assert "--trust-remote-code" in str(caught.value)
    captioner = VLLMCaptioner(model=folder, trust_remote_code=True)
    assert captioner.engine_options["trust_remote_code"] is True


def test_system_prompt_for_a_family_without_one_fails_at_construction(tmp_path):
    with pytest.raises(CaptionkitError, match="--system-prompt"):
        VLLMCaptioner(model=model_folder(tmp_path, "blip-2"), chat=ChatSettings(system_prompt="Be brief."))


# engine and sampling arguments ----------------------------------------------------------------
def test_sampling_kwargs_greedy_leaves_sampling_knobs_out():
    options = sampling_kwargs(ChatSettings(top_p=1.0, max_new_tokens=40))
    assert options == {"n": 1, "max_tokens": 40, "temperature": 0.0}


def test_sampling_kwargs_sampling_maps_every_setting():
    chat = ChatSettings(temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, max_new_tokens=64,
                        samples=3, seed=7)
    assert sampling_kwargs(chat) == {
        "n": 3, "max_tokens": 64, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 7,
        "repetition_penalty": 1.1,
    }
    assert sampling_kwargs(ChatSettings(repetition_penalty=1.2))["repetition_penalty"] == 1.2


def test_engine_kwargs(tmp_path):
    hub = engine_kwargs("llava-hf/llava-1.5-7b-hf")
    assert hub == {
        "model": "llava-hf/llava-1.5-7b-hf", "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9,
        "dtype": "auto", "trust_remote_code": False, "limit_mm_per_prompt": {"image": 1},
    }
    folder = model_folder(tmp_path, "llava")
    full = engine_kwargs(
        folder, tensor_parallel_size=2, max_model_len=4096, max_num_seqs=16, gpu_memory_utilization=0.8,
        dtype="bf16", trust_remote_code=True, cache_dir=tmp_path / "hf", revision="abc123", seed=5,
    )
    assert full["model"] == str(Path(folder).resolve())
    assert full["tensor_parallel_size"] == 2 and full["max_model_len"] == 4096 and full["max_num_seqs"] == 16
    assert full["dtype"] == "bfloat16" and full["download_dir"] == str(tmp_path / "hf")
    assert full["revision"] == full["tokenizer_revision"] == "abc123" and full["seed"] == 5
    assert engine_kwargs("m", dtype="fp16")["dtype"] == "float16"
    assert engine_kwargs("m", dtype="fp32")["dtype"] == "float32"


@pytest.mark.parametrize("options, flag", [
    ({"tensor_parallel_size": 0}, "--tensor-parallel-size"),
    ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization"),
    ({"max_model_len": 0}, "--max-model-len"),
    ({"max_num_seqs": 0}, "--max-num-seqs"),
    ({"dtype": "int8"}, "--dtype"),
])
def test_engine_kwargs_refuse_bad_values(options, flag):
    with pytest.raises(CaptionkitError, match=flag):
        engine_kwargs("m", **options)


def test_build_requests_use_the_filled_prompt_or_the_default():
    image = Image.new("RGB", (8, 8))
    chat = ChatSettings(prompt="Caption it.")
    requests = [CaptionRequest(image, (8, 8), "Name the {x}: a cat"), CaptionRequest(image, (8, 8))]
    built = build_requests(requests, "llava", chat)
    assert built[0] == {
        "prompt": "USER: <image>\nName the {x}: a cat\nASSISTANT:", "multi_modal_data": {"image": image},
    }
    assert built[1]["prompt"] == "USER: <image>\nCaption it.\nASSISTANT:"
    assert built[1]["multi_modal_data"]["image"] is image


def completion(text, reason="stop"):
    return SimpleNamespace(text=text, finish_reason=reason)


def test_parse_outputs():
    outputs = [
        SimpleNamespace(outputs=[completion(" A red bicycle. "), completion("A bike.", "length")]),
        SimpleNamespace(outputs=[completion("   ", "stop")]),
        SimpleNamespace(outputs=[]),
        SimpleNamespace(outputs=[completion(""), completion("Only this.")]),
    ]
    raws = parse_outputs(outputs)
    assert raws[0] == {"texts": ["A red bicycle.", "A bike."], "finish_reasons": ["stop", "length"]}
    assert isinstance(raws[1], ItemFailure) and "no text" in raws[1].message and "stop" in raws[1].message
    assert isinstance(raws[2], ItemFailure)
    assert raws[3] == {"texts": ["Only this."], "finish_reasons": ["stop"]}
    assert VLLMCaptioner.render_texts(raws[0]) == ["A red bicycle.", "A bike."]  # unbound, as stored_texts calls it


# glue with a fake vllm ---------------------------------------------------------------------
class FakeVLLM:
    """Stands in for the ``vllm`` package: records engines, calls and shutdowns."""

    def __init__(self, version="0.33.0", fail_on=None, with_shutdown=True, load_error=None):
        self.engines: list = []
        self.cleanups = 0
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs
                self.n = kwargs.get("n", 1)

        class LLM:
            def __init__(self, **kwargs):
                if load_error is not None:
                    raise load_error
                self.kwargs = kwargs
                self.calls: list = []
                self.shutdowns = 0
                fake.engines.append(self)

            def generate(self, prompts, sampling_params=None, use_tqdm=True):
                self.calls.append((list(prompts), sampling_params, use_tqdm))
                if fail_on and any(fail_on in item["prompt"] for item in prompts):
                    raise ValueError("The decoder prompt (length 9000) is longer than the maximum model length "
                                     "of 4096.")
                return [
                    SimpleNamespace(outputs=[completion(f" caption {index}.{sample} ")
                                             for sample in range(sampling_params.n)])
                    for index, _ in enumerate(prompts)
                ]

        if with_shutdown:
            def shutdown(self):
                self.shutdowns += 1

            LLM.shutdown = shutdown
        self.module = types.ModuleType("vllm")
        self.module.__version__ = version
        self.module.LLM = LLM
        self.module.SamplingParams = SamplingParams
        self.distributed = types.ModuleType("vllm.distributed")
        self.parallel_state = types.ModuleType("vllm.distributed.parallel_state")

        def cleanup_dist_env_and_memory():
            fake.cleanups += 1

        self.parallel_state.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory
        self.distributed.parallel_state = self.parallel_state

    def install(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "vllm", self.module)
        monkeypatch.setitem(sys.modules, "vllm.distributed", self.distributed)
        monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", self.parallel_state)
        return self


def requests_for(count, prompt=None):
    return [CaptionRequest(Image.new("RGB", (32, 24), (200, 0, 0)), (32, 24), prompt) for _ in range(count)]


def test_load_caption_unload_with_a_fake_vllm(tmp_path, monkeypatch):
    fake = FakeVLLM().install(monkeypatch)
    folder = model_folder(tmp_path, "qwen2_vl")
    chat = ChatSettings(prompt="Describe.", temperature=0.8, samples=2, seed=11, max_new_tokens=32)
    captioner = VLLMCaptioner(model=folder, chat=chat, tensor_parallel_size=2, max_model_len=4096, max_num_seqs=8,
                              gpu_memory_utilization=0.85, dtype="bf16")
    captioner.load()
    captioner.load()  # once
    assert len(fake.engines) == 1
    engine = fake.engines[0]
    assert engine.kwargs == {
        "model": str(Path(folder).resolve()), "tensor_parallel_size": 2, "gpu_memory_utilization": 0.85,
        "dtype": "bfloat16", "trust_remote_code": False, "limit_mm_per_prompt": {"image": 1},
        "max_model_len": 4096, "max_num_seqs": 8, "seed": 11,
    }
    raws = captioner.caption_batch(requests_for(2, "Describe the {subject}: red"))
    assert raws == [
        {"texts": ["caption 0.0", "caption 0.1"], "finish_reasons": ["stop", "stop"]},
        {"texts": ["caption 1.0", "caption 1.1"], "finish_reasons": ["stop", "stop"]},
    ]
    assert len(engine.calls) == 1  # one generate call per batch
    prompts, params, use_tqdm = engine.calls[0]
    assert use_tqdm is False
    assert params.kwargs == {"n": 2, "max_tokens": 32, "temperature": 0.8, "seed": 11}
    assert "<|image_pad|><|vision_end|>Describe the {subject}: red<|im_end|>" in prompts[0]["prompt"]
    assert prompts[0]["multi_modal_data"]["image"].size == (32, 24)
    assert captioner.render_texts(raws[0]) == ["caption 0.0", "caption 0.1"]

    captioner.unload()
    assert engine.shutdowns == 1 and fake.cleanups == 1
    captioner.unload()  # idempotent
    assert engine.shutdowns == 1 and fake.cleanups == 1
    with pytest.raises(CaptionkitError, match="load"):
        captioner.caption_batch(requests_for(1))
    captioner.load()  # a fresh engine after unload
    assert len(fake.engines) == 2


def test_unload_falls_back_to_the_engine_core_client(tmp_path, monkeypatch):
    fake = FakeVLLM(with_shutdown=False).install(monkeypatch)
    captioner = VLLMCaptioner(model=model_folder(tmp_path, "llava", **LANGUAGE_MODELS["llava"]))
    captioner.load()
    core = SimpleNamespace(stopped=0)
    core.shutdown = lambda: setattr(core, "stopped", core.stopped + 1)
    fake.engines[0].llm_engine = SimpleNamespace(engine_core=core)
    captioner.unload()
    assert core.stopped == 1 and fake.cleanups == 1


def test_a_refused_request_fails_only_its_image(tmp_path, monkeypatch):
    fake = FakeVLLM(fail_on="TOO LONG").install(monkeypatch)
    captioner = VLLMCaptioner(model=model_folder(tmp_path, "gemma3"), max_model_len=4096)
    captioner.load()
    batch = requests_for(1, "fine") + requests_for(1, "TOO LONG") + requests_for(1, "fine too")
    raws = captioner.caption_batch(batch)
    assert raws[0]["texts"] == ["caption 0.0"] and raws[2]["texts"] == ["caption 0.0"]
    assert isinstance(raws[1], ItemFailure)
    assert "maximum model length" in raws[1].message and "--max-model-len" in raws[1].message
    assert len(fake.engines[0].calls) == 4  # the batch, then one by one
    assert isinstance(captioner.caption_batch(requests_for(1, "TOO LONG"))[0], ItemFailure)


def test_engine_start_failure_is_one_plain_error(tmp_path, monkeypatch):
    import torch

    FakeVLLM(load_error=RuntimeError("CUDA out of memory")).install(monkeypatch)
    captioner = VLLMCaptioner(model=model_folder(tmp_path, "llava_onevision"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: memory is the likely cause
    with pytest.raises(CaptionkitError, match="CUDA out of memory.*--max-model-len"):
        captioner.load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU at all: that is what it says
    with pytest.raises(CaptionkitError, match="torch sees no CUDA GPU here") as caught:
        captioner.load()
    assert "Out of GPU memory" not in str(caught.value)


def test_mllama_is_refused_on_vllm_releases_that_dropped_it(tmp_path, monkeypatch):
    folder = model_folder(tmp_path, "mllama")
    FakeVLLM(version="0.11.0").install(monkeypatch)
    with pytest.raises(CaptionkitError, match="mllama"):
        VLLMCaptioner(model=folder).load()
    fake = FakeVLLM(version="0.10.2").install(monkeypatch)
    VLLMCaptioner(model=folder).load()
    assert len(fake.engines) == 1


def test_missing_vllm_gives_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    captioner = VLLMCaptioner(model=model_folder(tmp_path, "qwen2_5_vl"))
    with pytest.raises(MissingDependencyError) as caught:
        captioner.load()
    message = str(caught.value)
    assert "--backend vllm" in message and "pip install 'captionkit[vllm]'" in message and "docs/vllm.md" in message


# identity and images ----------------------------------------------------------------------
def test_fingerprint(tmp_path):
    folder = model_folder(tmp_path, "llava", **LANGUAGE_MODELS["llava"])
    base = VLLMCaptioner(model=folder, max_model_len=4096).fingerprint()
    assert base["backend"] == "vllm" and base["family"] == "llava"
    assert base["model"] == "local" and base["revision"].startswith("content:")  # its content, not its place
    assert base["template"] == "USER: <image>\n{prompt}\nASSISTANT:"
    assert base["chat"] == ChatSettings().fingerprint() and base["dtype"] == "auto"
    assert "tensor_parallel_size" not in base and "max_num_seqs" not in base
    same = VLLMCaptioner(model=folder, max_model_len=4096, tensor_parallel_size=4, max_num_seqs=2,
                         gpu_memory_utilization=0.5).fingerprint()
    assert same == base
    for changed in ({"max_model_len": 8192}, {"max_image_side": 512}, {"dtype": "fp16"},
                    {"chat": ChatSettings(system_prompt="Be brief.")}):
        assert VLLMCaptioner(model=folder, **{"max_model_len": 4096, **changed}).fingerprint() != base


def test_preprocess_downscales_only_with_max_image_side(tmp_path):
    folder = model_folder(tmp_path, "qwen2_vl")
    image = Image.new("RGB", (400, 200))
    assert VLLMCaptioner(model=folder).preprocess(image) is image
    assert VLLMCaptioner(model=folder).image_size() is None
    small = VLLMCaptioner(model=folder, max_image_side=100)
    assert small.preprocess(image).size == (100, 50) and image.size == (400, 200)
    assert small.image_size() == (100, 100)
    with pytest.raises(CaptionkitError, match="--max-image-side"):
        VLLMCaptioner(model=folder, max_image_side=4)


def test_registered_as_the_vllm_backend():
    info = get_backend("vllm")
    assert info.factory is VLLMCaptioner and info.kind == "captioner" and info.model_types == ()
    assert info.extras == ("vllm",)
