"""Tiny chat VLMs with random weights, built offline from configs, for tests and benchmarks.

One module per family group; each exposes ``build_<family>(folder, seed=0) -> Path`` that
saves a complete folder (weights, config, processor, tokenizer with a chat template)
loadable with ``AutoProcessor``/``AutoModelForImageTextToText.from_pretrained``.
"""
