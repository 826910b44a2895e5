"""Load test of `jaxlm serve`: throughput and latency of streaming clients at 1, 4, 16 and 64 concurrent.

Starts `jaxlm serve RUN_DIR --slots 64` in a subprocess on 127.0.0.1 (a free port), then for each
concurrency C sends a bounded number of streaming chat completions (C clients, each sending its requests
one after another; prompts are lines of the embedded corpus, sampled at temperature 0.8 with fixed seeds)
and measures, per level: completion tokens/s over the level's wall time, time to first token (TTFT) and
inter-token latency (ITL, the gaps between content chunks) p50/p99. Concurrency 1 is serving one request at
a time: the ratio column is each level's tokens/s over it. Every request must finish (no error, none lost).

    python experiments/bench_serve.py [--run-dir runs/llama_tiny] [--max-tokens 64] [--requests-per-client 2]

Writes experiments/results/bench_serve.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import RESULTS, commit  # noqa: E402


def peak_rss_gb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def start_server(run_dir: str, port: int, slots: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxlm", "serve", run_dir, "--port", str(port), "--slots", str(slots), *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 1200  # a real model compiles its steps for a while
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up in 1200 s")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    stamps, tokens, done, error = [], 0, False, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"]["message"]
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    if error or not done:
        return {"error": error or "stream ended without [DONE]"}
    return {"ttft": (stamps[0] - sent) if stamps else None, "itl": np.diff(stamps).tolist(), "tokens": tokens}


async def level(url: str, model: str, prompts: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:

        async def client(c: int) -> list[dict]:
            out = []
            for i in range(per_client):
                k = c * per_client + i
                out.append(await one_request(http, model, prompts[k % len(prompts)], max_tokens, seed=k))
            return out

        t = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1e3, 1) if xs else None  # noqa: E731
    return {
        "concurrency": clients,
        "requests": len(results),
        "failed": len(errors),
        "errors": errors[:3],
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_ms_p50": pct(ttft, 50),
        "ttft_ms_p99": pct(ttft, 99),
        "itl_ms_p50": pct(itl, 50),
        "itl_ms_p99": pct(itl, 99),
    }


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["levels"]
    c = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(c, [r["tokens_per_s"] for r in rows], "o-", label="jaxlm serve (continuous batching)")
    a.plot(c, [rows[0]["tokens_per_s"]] * len(c), "--", color="gray", label="one request at a time")
    a.set(xscale="log", xlabel="concurrent streaming clients", ylabel="completion tokens/s", xticks=c)
    a.set_xticklabels([str(x) for x in c])
    a.legend(fontsize=8)
    for key, style in (("ttft_ms", "o-"), ("itl_ms", "s-")):
        b.plot(c, [r[f"{key}_p50"] for r in rows], style, label=f"{key[:-3].upper()} p50")
        b.plot(c, [r[f"{key}_p99"] for r in rows], style, alpha=0.4, label=f"{key[:-3].upper()} p99")
    b.set(xscale="log", yscale="log", xlabel="concurrent streaming clients", ylabel="ms", xticks=c)
    b.set_xticklabels([str(x) for x in c])
    b.legend(fontsize=8)
    fig.suptitle(f"{out['model']}: {out['max_tokens']} tokens per request, {out['slots']} slots", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/llama_tiny")
    p.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    p.add_argument("--warm-up-tokens", type=int, default=None, help="passed to jaxlm serve")
    p.add_argument("--out", default=str(RESULTS / "bench_serve"))
    args = p.parse_args()

    from jaxlm.data.corpus import embedded_works
    from jaxlm.serve.server import free_port

    lines = [x.strip() for x in embedded_works()["hamlet.txt"].splitlines() if len(x.strip()) > 20]
    prompts = lines[:: max(1, len(lines) // 512)]
    port = free_port()
    extra = [] if args.warm_up_tokens is None else ["--warm-up-tokens", str(args.warm_up_tokens)]
    proc = start_server(args.run_dir, port, args.slots, extra)
    url = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(level(url, model, prompts, 2, 1, 8))  # warm the HTTP path
        rows = []
        for c in [int(x) for x in args.levels.split(",")]:
            per_client = max(args.requests_per_client, -(-args.min_requests // c))
            row = asyncio.run(level(url, model, prompts, c, per_client, args.max_tokens))
            row["vs_one_at_a_time"] = round(row["tokens_per_s"] / (rows[0] if rows else row)["tokens_per_s"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        health = httpx.get(url + "/health").json()
        server_rss = peak_rss_gb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    out = {
        "model": args.run_dir,
        "slots": args.slots,
        "max_tokens": args.max_tokens,
        "levels": rows,
        "lost_or_failed": sum(r["failed"] for r in rows),
        "server_peak_rss_gb": round(server_rss, 2),
        "kv": {k: v for k, v in health.items() if k.startswith("kv_")},
        "command": " ".join(["python", *sys.argv]),
        "commit": commit(),
    }
    print(f"{'C':>3} {'req':>4} {'tok/s':>8} {'x1':>6} {'TTFT p50/p99 ms':>18} {'ITL p50/p99 ms':>16}")
    for r in rows:
        print(
            f"{r['concurrency']:>3} {r['requests']:>4} {r['tokens_per_s']:>8} {r['vs_one_at_a_time']:>6} "
            f"{r['ttft_ms_p50']:>8}/{r['ttft_ms_p99']:<9} {r['itl_ms_p50']:>7}/{r['itl_ms_p99']:<8}"
        )
    print(f"server peak RSS {server_rss:.2f} GB; KV pool {health['kv_bytes'] / 2**20:.0f} MB")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=1))
    plot(out, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.json')} and .png")
    if out["lost_or_failed"]:
        raise SystemExit(f"{out['lost_or_failed']} requests failed")


if __name__ == "__main__":
    main()
