"""Serving under load: `ling serve` vs `transformers serve --continuous-batching`, side by side.

    python benchmarks/bench_serve.py [--model 6x384|llama-110m] [--clients 1 8] [--requests 4]
                                     [--max-tokens 128] [--rounds 3] [--max-batch-size 8] [--threads 2]
                                     [--peer transformers|none]

Both servers run at once, on the same machine, and load the same transformers directory: a
Llama-style model (6 layers × 384, or the llama-110m preset's 12 × 768 with 4 kv heads;
SwiGLU, RoPE, untied head, 1024 positions) with a byte-level BPE tokenizer (2048 entries,
trained on tinyshakespeare) and a chat template. The weights are random (their values do
not change the cost) and the EOS row of the LM head is zero, so greedy decoding never stops
early: every request generates exactly --max-tokens tokens on both servers.

Each client is a closed loop: it sends a streaming chat request (a passage of
tinyshakespeare as the user message, --prompt-chars long; greedy), reads the stream to the
end, then sends the next, --requests times. Every round runs every (server, clients) case once, interleaved,
so a busy machine slows all cases alike. Reported per case:

- aggregate tokens/s: completion tokens of all clients / wall time of the case (median of rounds)
- time to first token (TTFT): request sent → first chunk with text (p50, p99 over all requests)
- per-token latency (TPOT): (last chunk − first chunk) / (tokens − 1) of each request (p50, p99)

The issue's target: ling's aggregate tokens/s with 8 concurrent clients ≥ 4× one client's.
Decoding batches (8 rows cost far less than 8 × one row); prefill does not (on a CPU it is
compute-bound already), so the longer the prompts are next to --max-tokens, the smaller the
gain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("/work/shared/data/tinyshakespeare.txt")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m.role }}\n{{ m.content }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


SHAPES = {  # Llama-style: (layers, width, heads, kv heads, MLP hidden)
    "6x384": (6, 384, 6, 6, 1024),
    "llama-110m": (12, 768, 12, 4, 2432),  # the llama-110m preset's shape
}


def make_model(text: str, out: Path, shape: str) -> Path:
    """A random-init Llama-style model with a BPE tokenizer and chat template, as a transformers
    directory: both servers load this same directory (ling converts it on the fly)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ling.tokenizer import Tokenizer

    tokenizer = Tokenizer.train_bpe([text], vocab_size=2048)
    layers, width, heads, kv_heads, hidden = SHAPES[shape]
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=width, intermediate_size=hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_id] = 0
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, bos_token="<|bos|>",
                                           eos_token="<|eos|>", pad_token="<|pad|>")
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(out / "model")
    hf_tokenizer.save_pretrained(out / "model")
    return out / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, command: list[str], url: str | None, model: str, threads: int):
        self.name, self.model = name, model
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=env)
        if url is None:  # ling prints where it listens (it was given port 0)
            line = self.proc.stdout.readline()
            url = re.search(r"at (http://[\d.]+:\d+)/v1", line).group(1)
        self.url = url
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.5)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int) -> dict:
    body = {"model": server.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    sent = time.perf_counter()
    first = last = None
    chunks = 0
    async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    return {"ttft": first - sent, "tpot": (last - first) / (max_tokens - 1), "chunks": chunks}


async def run_case(server: Server, clients: int, requests: int, max_tokens: int, prompts: list[str]) -> dict:
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def closed_loop(c):
            return [await one_request(client, server, prompts[(c * requests + i) % len(prompts)], max_tokens)
                    for i in range(requests)]

        start = time.perf_counter()
        results = await asyncio.gather(*(closed_loop(c) for c in range(clients)))
        wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    return {"tok_s": len(flat) * max_tokens / wall, "ttft": [r["ttft"] for r in flat], "tpot": [r["tpot"] for r in flat]}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(SHAPES), default="6x384")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=4, help="requests per client per case")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-chars", type=int, nargs=2, default=[40, 160], metavar=("MIN", "MAX"),
                        help="length of the user message (tinyshakespeare passages; ~4 characters per token)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--peer", choices=["transformers", "none"], default="transformers")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of each server (OMP_NUM_THREADS)")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    text = args.data.read_text()
    rng = random.Random(0)
    low, high = args.prompt_chars
    starts = [rng.randrange(len(text) - high) for _ in range(64)]
    prompts = [text[s:s + rng.randrange(low, high + 1)] for s in starts]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(text, Path(tmp), args.model)
        servers = [Server("ling serve", [sys.executable, "-m", "ling", "serve", str(model_dir), "--port", "0",
                                         "--max-batch-size", str(args.max_batch_size), "--model-name", str(model_dir)],
                          None, str(model_dir), args.threads)]
        if args.peer == "transformers":
            port = free_port()
            servers.append(Server("transformers serve", [
                sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--port", str(port),
                "--device", "cpu", "--continuous-batching", "--log-level", "error"],
                f"http://localhost:{port}", str(model_dir), args.threads))
        try:
            for server in servers:  # warm-up: first-request costs (allocation, lazy init) are not measured
                asyncio.run(run_case(server, max(args.clients), 1, 8, prompts))
            stats = {(s.name, c): [] for s in servers for c in args.clients}
            for r in range(args.rounds):
                for clients in args.clients:
                    for server in servers:
                        stats[server.name, clients].append(
                            asyncio.run(run_case(server, clients, args.requests, args.max_tokens, prompts)))
                        print(f"round {r + 1}: {server.name:<20} {clients} clients "
                              f"{stats[server.name, clients][-1]['tok_s']:7.1f} tok/s", file=sys.stderr)
        finally:
            for server in servers:
                server.stop()

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"server threads {args.threads}, load average {os.getloadavg()[0]:.1f}; date {time.strftime('%Y-%m-%d')}")
    print(f"command: python benchmarks/bench_serve.py --model {args.model} --clients {' '.join(map(str, args.clients))} "
          f"--requests {args.requests} --max-tokens {args.max_tokens} "
          f"--prompt-chars {args.prompt_chars[0]} {args.prompt_chars[1]} --rounds {args.rounds} "
          f"--max-batch-size {args.max_batch_size} --threads {args.threads} --peer {args.peer}\n")
    print("| server | clients | aggregate tok/s | × 1 client | TTFT p50 / p99 (ms) | per-token p50 / p99 (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for server in servers:
        base = statistics.median(c["tok_s"] for c in stats[server.name, args.clients[0]])
        for clients in args.clients:
            cases = stats[server.name, clients]
            tok_s = statistics.median(c["tok_s"] for c in cases)
            ttft = [t * 1000 for c in cases for t in c["ttft"]]
            tpot = [t * 1000 for c in cases for t in c["tpot"]]
            print(f"| {server.name} | {clients} | {tok_s:.1f} | {tok_s / base:.2f}× | {pct(ttft, 50):.0f} / "
                  f"{pct(ttft, 99):.0f} | {pct(tpot, 50):.1f} / {pct(tpot, 99):.1f} |")


if __name__ == "__main__":
    main()
