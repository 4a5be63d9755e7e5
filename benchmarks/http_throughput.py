"""Server captioning throughput: one request at a time vs ``OpenAICaptioner``'s concurrent requests.

A local chat-completions server answers every request after a fixed latency (the time a
real server spends generating), so the numbers measure how well the client hides it.
Both sides use the same ``openai`` client, the same images (encoded once) and the same
request body.

    python benchmarks/http_throughput.py                      # 64 images, 50 ms, concurrency 8
    python benchmarks/http_throughput.py --latency 0.2 --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from captionkit.models.base import CaptionRequest, ChatSettings
from captionkit.models.openai_server import OpenAICaptioner


def start_server(latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real servers
        disable_nagle_algorithm = True  # else delayed ACKs add ~40 ms to every reply

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency)
            reply = json.dumps({
                "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "a photo of a test pattern"}}],
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def make_images(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server takes per request")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = parser.parse_args()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        os.environ.pop(name, None)

    import openai

    server = start_server(args.latency)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    chat = ChatSettings(max_new_tokens=64)
    backend = OpenAICaptioner(model="bench", base_url=url, chat=chat, concurrency=args.concurrency)
    images = make_images(args.images, args.size)
    payloads = [backend.preprocess(image) for image in images]

    # baseline: the plain loop a script would write
    client = openai.OpenAI(api_key="EMPTY", base_url=url, max_retries=0, timeout=30)
    start = time.perf_counter()
    for payload in payloads:
        reply = client.chat.completions.create(
            model="bench", messages=backend.messages(chat.prompt, payload), temperature=0.0, max_tokens=64,
        )
        assert reply.choices[0].message.content
    loop_s = time.perf_counter() - start
    client.close()

    backend.load()
    requests = [CaptionRequest(payload, image.size) for payload, image in zip(payloads, images, strict=True)]
    start = time.perf_counter()
    results = backend.caption_batch(requests)
    backend_s = time.perf_counter() - start
    backend.unload()
    server.shutdown()
    failures = sum(1 for result in results if not isinstance(result, dict))

    loop_rate, backend_rate = args.images / loop_s, args.images / backend_s
    ideal = min(args.concurrency, args.images) / args.latency if args.latency else float("inf")
    print(f"{args.images} images of {args.size}², server latency {args.latency * 1000:.0f} ms")
    print(f"one request at a time (openai client loop): {loop_rate:7.1f} images/s ({loop_s:.2f} s)")
    print(f"OpenAICaptioner, concurrency {args.concurrency}:        {backend_rate:7.1f} images/s ({backend_s:.2f} s)"
          f"  [{failures} failures]")
    print(f"speed-up: {backend_rate / loop_rate:.2f}x  (latency-bound ceiling {ideal:.0f} images/s)")


if __name__ == "__main__":
    main()
