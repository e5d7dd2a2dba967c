"""What `mlx-sleep serve` costs over HTTP, on a small random hybrid (hidden 256, attn + gdn x 3,
byte-level tokenizer, N = 2, L = 512), the real server on a loopback port in this process.

  (a) a long conversation: per turn, the tokens fed and the time to the whole reply, continuing
      the held memory against re-feeding the whole conversation (a fresh session each turn)
  (b) load: C clients at once, each its own conversation of R turns; replies/s, tokens/s,
      latency percentiles and 429s (--queue 8; a client refused retries after 0.2 s)

    python benchmarks/serve.py            # writes benchmarks/results/serve.{json,md}
    python benchmarks/serve.py --quick    # fewer turns and clients
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mlx_sleep  # noqa: E402,F401  (BLAS first)
import httpx  # noqa: E402
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_sleep import HybridLM, ModelConfig, SleepConfig  # noqa: E402
from mlx_sleep.cli.common import load_for_chat  # noqa: E402
from mlx_sleep.io import write_json, write_text  # noqa: E402
from mlx_sleep.serve import Server, Settings, listen, uvicorn_server  # noqa: E402

MODEL = "bench"
LINE = "Here is one more paragraph of notes for the project log, to be remembered later on. "


def make_model(root) -> str:
    from mlx_sleep.convert import FORMAT
    from mlx_sleep.convert.common import save_model_dir
    from mlx_sleep.io import read_json
    from tests.tiny_models import EOS, write_tokenizer

    # the 256 bytes and 3 special tokens, no reserved ids: a reply the client sends back
    # re-encodes to about the tokens the model generated (bytes that are not UTF-8 excepted)
    vocab = 259

    mx.random.seed(0)
    model = HybridLM(
        ModelConfig(vocab_size=vocab, hidden_size=256, num_heads=4, layers="attn,gdn,gdn,gdn")
    )
    path = os.path.join(root, MODEL)
    config = {
        "format": FORMAT,
        "model_type": "hybrid",
        "model": model.config.to_dict(),
        "sleep": SleepConfig(loops=2, window=512).to_dict(),
        "source": {"path": "benchmarks/serve.py"},
    }
    save_model_dir(path, config, dict(tree_flatten(model.parameters())), None)
    special = write_tokenizer(path, vocab)
    config = read_json(os.path.join(path, "config.json"))
    config["eos_token_id"] = special[EOS]
    write_json(os.path.join(path, "config.json"), config)
    return path


def start(path, **settings):
    directory, model, tokenizer = load_for_chat(path)
    server = Server(model, tokenizer, directory, Settings(**settings), note=lambda text: None)
    sock = listen("127.0.0.1", 0)
    uv = uvicorn_server(server)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    return server, uv, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def post(h, messages, max_tokens, session=None):
    """(response JSON, seconds, 429s before it was taken)"""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens}
    headers = {"X-Session": session} if session else {}
    refused = 0
    while True:
        t = time.perf_counter()
        r = h.post("/v1/chat/completions", json=body, headers=headers)
        if r.status_code != 429:
            r.raise_for_status()
            return r.json(), time.perf_counter() - t, refused
        refused += 1
        time.sleep(0.2)


def conversation(url, turns, max_tokens, fresh):
    """One conversation; per turn (fed, held, seconds). `fresh`: a new session each turn, so
    the whole conversation is fed every time (what a server without memory does)."""
    out, messages = [], []
    with httpx.Client(base_url=url, timeout=600) as h:
        for k in range(turns):
            messages.append({"role": "user", "content": f"Turn {k}. " + LINE * 3})
            r, seconds, _ = post(h, messages, max_tokens, f"fresh-{k}" if fresh else None)
            usage = r["usage"]
            held = usage["prompt_tokens_details"]["cached_tokens"]
            out.append((usage["prompt_tokens"] - held, held, seconds))
            messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
    return out


def bench_conversation(path, turns, max_tokens):
    server, uv, thread, url = start(path, idle_delay=0, max_tokens=max_tokens)
    try:
        res = {}
        for mode in ("continue", "refeed"):
            rows = conversation(url, turns, max_tokens, fresh=mode == "refeed")
            res[mode] = [dict(zip(("fed", "held", "seconds"), row)) for row in rows]
    finally:
        uv.should_exit = True
        thread.join()
    return res


def bench_load(path, clients, turns, max_tokens, queue):
    server, uv, thread, url = start(path, idle_delay=0, queue=queue, max_sessions=max(clients, 8))
    results = []

    def client(i):
        messages = []
        with httpx.Client(base_url=url, timeout=600) as h:
            for k in range(turns):
                messages.append({"role": "user", "content": f"Client {i}, turn {k}. " + LINE})
                r, seconds, refused = post(h, messages, max_tokens)
                results.append((seconds, refused, r["usage"]))
                messages.append(
                    {"role": "assistant", "content": r["choices"][0]["message"]["content"]}
                )

    try:
        start_time = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start_time
    finally:
        uv.should_exit = True
        thread.join()
    latencies = sorted(r[0] for r in results)
    generated = sum(r[2]["completion_tokens"] for r in results)
    fed = sum(
        r[2]["prompt_tokens"] - r[2]["prompt_tokens_details"]["cached_tokens"] for r in results
    )
    return {
        "clients": clients,
        "replies": len(results),
        "wall_s": wall,
        "replies_per_s": len(results) / wall,
        "generated_tok_per_s": generated / wall,
        "fed_tok_per_s": fed / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "refused_429": sum(r[1] for r in results),
    }


def markdown(res) -> str:
    lines = [
        "# mlx-sleep serve: a long conversation and load",
        "",
        f"{res['machine']}; model: random hybrid, hidden 256, attn + gdn x 3, vocab 259, N = 2, "
        f"L = 512; max_tokens {res['max_tokens']}; each user turn ~{len(LINE) * 3 + 10} bytes "
        "(one token per byte).",
        "",
        "## (a) one conversation: continuing the held memory against re-feeding it all",
        "",
        "| turn | fed (continue) | held | s (continue) | fed (re-feed) | s (re-feed) |",
        "|---|---|---|---|---|---|",
    ]
    for k, (c, r) in enumerate(zip(res["conversation"]["continue"], res["conversation"]["refeed"])):
        lines.append(
            f"| {k + 1} | {c['fed']} | {c['held']} | {c['seconds']:.3f} | {r['fed']} | "
            f"{r['seconds']:.3f} |"
        )
    lines += [
        "",
        "## (b) load: C clients at once, one conversation each (--queue 8)",
        "",
        "| clients | replies | replies/s | generated tok/s | fed tok/s | p50 s | p95 s | 429s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["load"]:
        lines.append(
            f"| {r['clients']} | {r['replies']} | {r['replies_per_s']:.2f} | "
            f"{r['generated_tok_per_s']:.1f} | {r['fed_tok_per_s']:.1f} | "
            f"{r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | {r['refused_429']} |"
        )
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args()
    turns, clients = (4, [1, 4]) if args.quick else (12, [1, 4, 16])
    max_tokens = 32
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLX_SLEEP_HOME"] = os.path.join(tmp, "home")
        path = make_model(tmp)
        res = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__}",
            "max_tokens": max_tokens,
            "conversation": bench_conversation(path, turns, max_tokens),
            "load": [
                bench_load(path, c, 4 if not args.quick else 2, max_tokens, 8) for c in clients
            ],
        }
    os.makedirs(args.out, exist_ok=True)
    name = "serve_quick" if args.quick else "serve"
    write_json(os.path.join(args.out, f"{name}.json"), res)
    text = markdown(res)
    write_text(os.path.join(args.out, f"{name}.md"), text)
    print(text)


if __name__ == "__main__":
    main()
