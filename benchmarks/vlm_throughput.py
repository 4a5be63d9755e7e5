"""Chat-VLM captioning throughput, captionkit against the plain loops the seed scripts use, in one run.

1. A tiny random LLaVA (built offline): ``captionkit.caption`` (decode ahead in threads,
   batched left-padded generation) against a plain one-image-at-a-time loop (open →
   chat template → processor → generate). Same images, same greedy settings; the batched
   captions are checked equal to the loop's.
2. The OpenAI-compatible backend through ``captionkit.caption`` at ``--concurrency``
   against one request at a time, both against a local server with a fixed latency.

    python benchmarks/vlm_throughput.py                  # 48 images, batch 8, 50 ms server latency
    python benchmarks/vlm_throughput.py --images 96 --batch-size 16 --latency 0.1
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from caption_throughput import make_images  # noqa: E402
from http_throughput import start_server  # noqa: E402

from captionkit._torchvision_compat import ensure_torchvision  # noqa: E402

PROMPT = "Describe this image in one sentence."


def plain_llava_loop(model_folder: Path, paths: list[Path], max_new_tokens: int) -> tuple[float, dict[str, str]]:
    """One image at a time on one thread, as a script would write it."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_folder)
    model = AutoModelForImageTextToText.from_pretrained(model_folder).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    captions = {}
    started = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGB")
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=processor.tokenizer.pad_token_id)
        captions[path.name] = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:],
                                                     skip_special_tokens=True)[0].strip()
    return time.perf_counter() - started, captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--image-side", type=int, default=512, help="JPEG side in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.05, help="server seconds per request")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        os.environ.pop(name, None)
    ensure_torchvision()
    import captionkit
    from captionkit.testing.vlms.llava import build_llava

    work = Path(tempfile.mkdtemp(prefix="ck-vlm-bench-"))
    try:
        model = build_llava(work / "tiny-llava")
        paths = make_images(work / "images", args.images, args.image_side)
        loop_s, loop_captions = plain_llava_loop(model, paths, args.max_new_tokens)
        summary = captionkit.caption(work / "images", model=str(model), prompt=PROMPT,
                                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                     write_sidecars=False, progress="quiet")
        from captionkit.core.store import Store

        with Store(work / "images") as store:
            stored = store.get_many("caption", [path.name for path in paths])
        same = sum(stored[name].raw["texts"][0] == text for name, text in loop_captions.items())
        loop_rate, ours = args.images / loop_s, summary.images_per_s
        print(f"tiny LLaVA, {args.images} JPEGs {args.image_side}², greedy, {args.max_new_tokens} new tokens")
        print(f"  plain one-at-a-time loop : {loop_rate:7.1f} images/s")
        print(f"  captionkit, batch {args.batch_size:<3}    : {ours:7.1f} images/s "
              f"(model busy {summary.model_busy_fraction:.0%})")
        print(f"  ratio {ours / loop_rate:.2f}x; batched captions equal to the loop's: {same}/{len(loop_captions)}")

        import openai

        server = start_server(args.latency)
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        client = openai.OpenAI(api_key="EMPTY", base_url=url, max_retries=0, timeout=30)
        from captionkit.models.openai_server import OpenAICaptioner

        encoder = OpenAICaptioner(model="bench", base_url=url)
        started = time.perf_counter()
        from PIL import Image

        for path in paths:
            data_url = encoder.preprocess(Image.open(path).convert("RGB"))
            client.chat.completions.create(model="bench", messages=encoder.messages(PROMPT, data_url),
                                           temperature=0.0, max_tokens=64)
        http_loop_s = time.perf_counter() - started
        client.close()
        http = captionkit.caption(work / "images", backend="openai", base_url=url, model="bench", prompt=PROMPT,
                                  concurrency=args.concurrency, write_sidecars=False, progress="quiet",
                                  output_dir=work / "http-out")
        server.shutdown()
        http_loop_rate = args.images / http_loop_s
        print(f"OpenAI-compatible server, {args.latency * 1000:.0f} ms per request")
        print(f"  one request at a time    : {http_loop_rate:7.1f} images/s")
        print(f"  captionkit, concurrency {args.concurrency}: {http.images_per_s:7.1f} images/s "
              f"({http.failed} failed)")
        print(f"  ratio {http.images_per_s / http_loop_rate:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
