"""What `mlx-sleep serve` costs over HTTP, on a small random hybrid (hidden 256, attn + gdn x 3,
byte-level tokenizer, N = 2, L = 512), the real server on a loopback port in this process.

  (a) a long conversation: per turn, the tokens fed and the time to the whole reply, continuing
      the held memory against re-feeding the whole conversation (a fresh session each turn)
  (b) load: C clients at once, each its own conversation of R turns; replies/s, tokens/s,
      latency percentiles and 429s (--queue 8; a client refused retries after 0.2 s)
  (c) against mlx_lm.server, both in their own process on the same tiny random Qwen3-Next
      (Hugging Face format for mlx_lm, converted by `mlx_sleep.convert` for mlx-sleep): 8
      clients at once, each a conversation of 20 turns of ~820 tokens (replies of 16) that
      grows past 16k tokens, streamed; tokens/s, time to first token p50/p99 by conversation
      length, the server's RSS over time (/proc, every 0.5 s), requests failed or lost

    python benchmarks/serve.py            # writes benchmarks/results/serve.{json,md}
    python benchmarks/serve.py --quick    # fewer turns and clients (serve_quick.{json,md})
    python benchmarks/serve.py --part c   # one part; the others' results are kept
"""

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
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
from mlx_sleep.io import read_json, write_json, write_text  # noqa: E402
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


# -- (c) against mlx_lm.server ------------------------------------------------------------------

WORDS = (
    "river stone garden lamp orbit copper violet harbor ledger signal meadow canyon pepper "
    "engine lantern quarry saddle timber velvet walnut anchor beacon cobalt delta ember falcon "
    "glacier hollow island juniper kettle lemon marble nectar oyster pillar quartz raven summit "
    "thistle umber valley willow yonder zephyr budget compiler kernel packet socket thread "
    "vector matrix tensor buffer"
).split()
BUCKETS = (4096, 8192, 12288, 16384)  # conversation length (tokens) buckets: 0-4k ... 16k+


def qwen3_next_checkpoint(root) -> str:
    """A tiny random Qwen3-Next in Hugging Face format (config.json, model.safetensors, a
    byte-level tokenizer with a ChatML template) that mlx_lm.server and our converter both load:
    hidden 256, 4 layers (GDN, GDN, GDN, attention: Qwen3-Next's 3:1), MoE MLPs of 4 experts.

    What mlx-lm 0.32.2 needs of it, found by loading (nothing is patched on its side): its
    qwen3_next ModelArgs requires `rope_theta` and `partial_rotary_factor` at the top of
    config.json (transformers 5 writes them only inside `rope_parameters`; released Qwen3-Next
    configs have them at the top), and its sanitize moves the conv1d axis only for MoE
    checkpoints (a dense one, mlp_only_layers everywhere, fails to load: conv1d.weight is
    (C, 1, K), it expects (C, K, 1)). So the config carries both and the MLPs are MoE.

    Replies are lowercase letters and spaces (lm_head's other rows are zero, so they never win
    the argmax over the random ones): a reply the client sends back re-encodes to the tokens
    the model generated, and each server can match the next turn against what it holds."""
    import torch
    import transformers

    from tests.tiny_models import write_tokenizer

    path = os.path.join(root, "qwen3-next-tiny")
    linear, full = "linear_attention", "full_attention"
    config = transformers.Qwen3NextConfig(
        vocab_size=259,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_hidden_layers=4,
        layer_types=[linear, linear, linear, full],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=256,
        max_position_embeddings=1 << 17,
        eos_token_id=258,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3NextForCausalLM(config).eval()
    allowed = [ord(c) for c in "abcdefghijklmnopqrstuvwxyz "]
    with torch.no_grad():
        head = model.lm_head.weight
        keep = head[allowed].clone()
        head.zero_()
        head[allowed] = keep
    # transformers writes the checkpoint itself, as a released one is written (its save maps
    # the fused experts back to one tensor per expert); config.json is rewritten below
    model.save_pretrained(path)
    hf = config.to_dict()
    rope = hf.get("rope_parameters") or {}
    hf["rope_theta"] = rope.get("rope_theta", 10000.0)
    hf["partial_rotary_factor"] = rope.get("partial_rotary_factor", 0.25)
    hf["architectures"] = ["Qwen3NextForCausalLM"]
    write_json(os.path.join(path, "config.json"), hf)
    write_tokenizer(path, 259)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class ServerProcess:
    """One server in its own process (its RSS is its own), on a free loopback port."""

    def __init__(self, kind, model_dir, max_tokens, log_path):
        self.kind, self.port = kind, free_port()
        if kind == "mlx-sleep serve":
            self.model = os.path.basename(model_dir)
            cmd = ["-m", "mlx_sleep.cli", "serve", "--model", model_dir, "--idle-delay", "0"]
            cmd += ["--max-tokens", str(max_tokens)]
        else:
            self.model = model_dir
            cmd = ["-m", "mlx_lm.server", "--model", model_dir]
        cmd = [sys.executable, *cmd, "--port", str(self.port)]
        # this checkout's mlx_sleep, whatever is installed
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        end = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                with open(log_path, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                raise SystemExit(f"{kind} exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                self.stop()
                raise SystemExit(f"{kind} did not start within 600 s; see {log_path}")
            time.sleep(0.5)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def turn_text(rng, client, turn, size) -> str:
    words = [f"Client {client}, turn {turn}:"]
    while sum(len(w) + 1 for w in words) < size:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def prompt_tokens(messages) -> int:
    """The rendered conversation's tokens with this tokenizer (bytes, ChatML's two specials per
    message, the generation prompt): what each server is asked to hold."""
    per = sum(len(m["role"]) + len(m["content"].encode()) + 4 for m in messages)
    return per + len("assistant") + 2


def stream_turn(h, model, messages, max_tokens) -> dict:
    """One streamed chat request: its first-token and total seconds, the reply, ok or why not."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = {"ok": False, "first_s": None, "text": "", "usage": None, "refused": 0}
    start = time.perf_counter()
    try:
        while True:
            with h.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code == 429:
                    out["refused"] += 1
                    time.sleep(0.2)
                    continue
                if r.status_code != 200:
                    out["error"] = f"HTTP {r.status_code}"
                    return out
                pieces = []
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        out["ok"] = True
                        break
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        out["usage"] = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            if out["first_s"] is None:
                                out["first_s"] = time.perf_counter() - start
                            pieces.append(piece)
                out["text"] = "".join(pieces)
                if not out["ok"]:
                    out["error"] = "the stream ended without [DONE]"
                break
    except (httpx.HTTPError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["seconds"] = time.perf_counter() - start
    return out


def bench_server(server, clients, turns, turn_size, max_tokens, deadline_s) -> dict:
    """`clients` conversations at once against `server`, until done or `deadline_s`; the
    server's RSS sampled every 0.5 s with the clients' mean conversation length then."""
    lengths, requests, samples = [0] * clients, [], []
    stop_sampling = threading.Event()
    t0 = time.perf_counter() + 2.0  # the clients start then: the idle server's RSS first

    def sample():
        while not stop_sampling.is_set():
            try:
                rss = rss_mib(server.proc.pid)
            except OSError:
                break
            samples.append((time.perf_counter() - t0, rss, sum(lengths) / clients))
            stop_sampling.wait(0.5)

    def client(i):
        rng, messages = random.Random(i), []
        with httpx.Client(base_url=server.url, timeout=900) as h:
            for k in range(turns):
                if time.perf_counter() - t0 > deadline_s:
                    return
                messages.append({"role": "user", "content": turn_text(rng, i, k, turn_size)})
                lengths[i] = prompt_tokens(messages)
                r = stream_turn(h, server.model, messages, max_tokens)
                messages.append({"role": "assistant", "content": r.pop("text")})
                requests.append(dict(r, client=i, turn=k, length=lengths[i]))
                if not r["ok"]:
                    return  # a conversation cannot go on without its reply

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(max(0.0, t0 - time.perf_counter()))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop_sampling.set()
    sampler.join()
    return summarize(requests, samples, wall, clients, turns)


BUCKET_NAMES = ("0-4k", "4-8k", "8-12k", "12-16k", "16k+")


def bucket_of(length) -> str:
    return BUCKET_NAMES[sum(length >= edge for edge in BUCKETS)]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def summarize(requests, samples, wall, clients, turns) -> dict:
    ok = [r for r in requests if r["ok"]]
    usage = [r["usage"] or {} for r in ok]
    generated = sum(u.get("completion_tokens", 0) for u in usage)
    cached = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in usage)
    fed = sum(u.get("prompt_tokens", 0) for u in usage) - cached
    ttft = {}
    for name in BUCKET_NAMES:
        firsts = [r["first_s"] for r in ok if bucket_of(r["length"]) == name and r["first_s"]]
        if firsts:
            ttft[name] = {
                "n": len(firsts),
                "p50_s": percentile(firsts, 0.5),
                "p99_s": percentile(firsts, 0.99),
            }
    during = [(t, rss, mean) for t, rss, mean in samples if t >= 0]
    by_length = {}
    for name in BUCKET_NAMES:
        rss = [x for _, x, mean in during if bucket_of(mean) == name]
        if rss:
            by_length[name] = max(rss)
    idle = [x for t, x, _ in samples if t < 0]
    return {
        "conversations": clients,
        "turns": turns,
        "requests_sent": len(requests),
        "requests_ok": len(ok),
        "failed": len(requests) - len(ok),
        "not_sent": clients * turns - len(requests),
        "errors": sorted({r.get("error", "") for r in requests if not r["ok"]})[:5],
        "refused_429": sum(r["refused"] for r in requests),
        "wall_s": wall,
        "generated_tok_per_s": generated / wall,
        "prompt_tokens_fed": fed,
        "prompt_tokens_cached": cached,
        "fed_tok_per_s": fed / wall,
        "longest_conversation": max((r["length"] for r in ok), default=0),
        "ttft": ttft,
        "rss_mib": {
            "idle": idle[-1] if idle else None,
            "max": max((x for _, x, _ in during), default=None),
            "end": during[-1][1] if during else None,
            "by_mean_length": by_length,
        },
        "samples": [(round(t, 2), round(x, 1), round(m)) for t, x, m in samples],
    }


def bench_versus_mlx_lm(root, clients, turns, turn_size, max_tokens, deadline_s) -> dict:
    from mlx_sleep.convert import convert

    hf = qwen3_next_checkpoint(root)
    converted = convert(hf, os.path.join(root, "qwen3-next-tiny-sleep"), loops=2, window=2048)
    res = {
        "model": "random Qwen3-Next: hidden 256, layers GDN x 3 + attention, 4 experts (top 2), "
        "vocab 259 (bytes + ChatML specials), float32",
        "sleep": "N = 2, L = 2048 (converted with --loops 2 --window 2048), hard eviction",
        "clients": clients,
        "turns": turns,
        "turn_tokens": turn_size,
        "max_tokens": max_tokens,
        "deadline_s": deadline_s,
        "mlx_lm": __import__("mlx_lm").__version__,
        "servers": {},
    }
    for kind, path in (("mlx-sleep serve", converted), ("mlx_lm.server", hf)):
        log = os.path.join(root, kind.split()[0].replace(".", "_") + ".log")
        print(f"(c) {kind}: {clients} clients x {turns} turns ...", flush=True)
        server = ServerProcess(kind, path, max_tokens, log)
        try:
            res["servers"][kind] = bench_server(
                server, clients, turns, turn_size, max_tokens, deadline_s
            )
        finally:
            server.stop()
        r = res["servers"][kind]
        print(
            f"    {r['requests_ok']}/{clients * turns} ok, {r['wall_s']:.0f} s, "
            f"RSS max {r['rss_mib']['max']:.0f} MiB",
            flush=True,
        )
    return res


def markdown(res) -> str:
    lines = ["# mlx-sleep serve: a long conversation, load, and mlx_lm.server", ""]
    if "conversation" in res or "load" in res:
        lines += [
            f"(a), (b): {res['machine']}; model: random hybrid, hidden 256, attn + gdn x 3, vocab "
            f"259, N = 2, L = 512; max_tokens {res['max_tokens']}; each user turn "
            f"~{len(LINE) * 3 + 10} bytes (one token per byte); the server in this process.",
            "",
        ]
    if "conversation" in res:
        lines += [
            "## (a) one conversation: continuing the held memory against re-feeding it all",
            "",
            "| turn | fed (continue) | held | s (continue) | fed (re-feed) | s (re-feed) |",
            "|---|---|---|---|---|---|",
        ]
        conversation = res["conversation"]
        for k, (c, r) in enumerate(zip(conversation["continue"], conversation["refeed"])):
            lines.append(
                f"| {k + 1} | {c['fed']} | {c['held']} | {c['seconds']:.3f} | {r['fed']} | "
                f"{r['seconds']:.3f} |"
            )
        lines.append("")
    if "load" in res:
        lines += [
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
        lines.append("")
    if "versus_mlx_lm" in res:
        lines += markdown_versus(res["versus_mlx_lm"], res.get("machine_c", res.get("machine")))
    return "\n".join(lines)


def markdown_versus(v, machine) -> list:
    servers = list(v["servers"])
    rows = v["servers"]

    def row(label, fn):
        cells = []
        for name in servers:
            try:
                cells.append(fn(rows[name]))
            except (KeyError, TypeError):
                cells.append("-")
        return f"| {label} | " + " | ".join(cells) + " |"

    def ttft(name):
        return lambda r: f"{r['ttft'][name]['p50_s']:.2f} / {r['ttft'][name]['p99_s']:.2f}"

    def rss_at(name):
        return lambda r: f"{r['rss_mib']['by_mean_length'][name]:.0f}"

    total = v["clients"] * v["turns"]
    out = [
        "## (c) 8 clients, conversations past 16k tokens: mlx-sleep serve against mlx_lm.server",
        "",
        f"{machine}; mlx_lm {v['mlx_lm']}; {v['model']}; mlx-sleep: {v['sleep']}. Each server in "
        f"its own process, its defaults but for mlx-sleep's --idle-delay 0 (no idle time in a "
        f"load test); {v['clients']} clients at once, each a conversation of {v['turns']} "
        f"turns of ~{v['turn_tokens']} tokens of varied words, replies of {v['max_tokens']} "
        "tokens (temperature 0), streamed; one server, then the other. Time to first token "
        "by the conversation's length when the request was sent; RSS (VmRSS of the server "
        "process, every 0.5 s) by the clients' mean conversation length then.",
        "",
        "| | " + " | ".join(servers) + " |",
        "|---|" + "---|" * len(servers),
        row(f"requests ok (of {total})", lambda r: f"{r['requests_ok']}"),
        row("failed / not sent", lambda r: f"{r['failed']} / {r['not_sent']}"),
        row("wall s", lambda r: f"{r['wall_s']:.0f}"),
        row("generated tok/s", lambda r: f"{r['generated_tok_per_s']:.1f}"),
        row("prompt tok/s fed", lambda r: f"{r['fed_tok_per_s']:.0f}"),
        row(
            "prompt tokens fed / cached",
            lambda r: f"{r['prompt_tokens_fed']:,} / {r['prompt_tokens_cached']:,}",
        ),
        row("longest conversation (tokens)", lambda r: f"{r['longest_conversation']:,}"),
    ]
    out += [row(f"first token p50 / p99 s, {name}", ttft(name)) for name in BUCKET_NAMES]
    out += [
        row(
            "RSS MiB idle / max / end",
            lambda r: "{idle:.0f} / {max:.0f} / {end:.0f}".format(**r["rss_mib"]),
        )
    ]
    out += [row(f"RSS MiB max, mean length {name}", rss_at(name)) for name in BUCKET_NAMES]
    return out + [""]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--part",
        default="abc",
        help="the parts to run, e.g. 'c' or 'ab' (default all); the others' results are kept",
    )
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args()
    if not args.part or set(args.part) - set("abc"):
        raise SystemExit(f"--part takes letters of 'abc' (got {args.part!r})")
    turns, clients = (4, [1, 4]) if args.quick else (12, [1, 4, 16])
    max_tokens = 32
    name = "serve_quick" if args.quick else "serve"
    previous = os.path.join(args.out, f"{name}.json")
    res = read_json(previous) if set(args.part) != set("abc") and os.path.exists(previous) else {}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__}"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLX_SLEEP_HOME"] = os.path.join(tmp, "home")
        if "a" in args.part or "b" in args.part:
            path = make_model(tmp)
            res.update(machine=machine, max_tokens=max_tokens)
        if "a" in args.part:
            res["conversation"] = bench_conversation(path, turns, max_tokens)
        if "b" in args.part:
            res["load"] = [
                bench_load(path, c, 4 if not args.quick else 2, max_tokens, 8) for c in clients
            ]
        if "c" in args.part:
            sizes = (4, 5, 820, 16, 180) if args.quick else (8, 20, 820, 16, 540)
            res["machine_c"] = machine
            res["versus_mlx_lm"] = bench_versus_mlx_lm(tmp, *sizes)
    os.makedirs(args.out, exist_ok=True)
    write_json(previous, res)
    text = markdown(res)
    write_text(os.path.join(args.out, f"{name}.md"), text)
    print(text)


if __name__ == "__main__":
    main()
