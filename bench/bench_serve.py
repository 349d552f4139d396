"""Load on ``posterior serve``: K concurrent clients, batched against serial, in one run.

Starts ``posterior serve`` (the default model unless ``--model``) once per round and mode, in
alternation: "batched" (the server's defaults: 20 ms window, up to 32 prompts per sampler call)
and "serial" (``--batch-window-ms 0 --max-batch-prompts 1``: one request per call, the queue
answered in order). In each, K clients send R requests each, one after another (no seed, so the
server may batch them; with ``--seeded`` every request carries its own seed, as lm-eval's do), and
the script checks that every request was answered exactly once with
status 200 and n choices; with ``--seeded`` it also counts the requests whose answer was the same
in every run (a request's seed fixes its answer whatever it is batched with, up to the model's
batched numerics). Prints throughput (requests/s), p50/p99 latency per mode (median over
rounds) and the batched/serial throughput ratio.

    python bench/bench_serve.py [--clients 32] [--requests 4] [--n 4] [--max-tokens 16] [--method is]
                                [--rounds 1] [--model PATH] [--threads N] [--seeded] [--particles P]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODES = {"batched": [], "serial": ["--batch-window-ms", "0", "--max-batch-prompts", "1"]}


def start(args, mode: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "posterior", "serve", "--port", "0", "--log-level", "warning", "--served-model-name", "m",
           "--max-queue", str(args.clients * 2), *MODES[mode]]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            continue
        if "serving http://" in line:
            url = line.split("serving ")[1].split()[0]
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/health", timeout=10).status_code == 200:
                        return proc, url
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start in 600 s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def load(url: str, args) -> dict:
    body = {"model": "m", "prompt": args.prompt, "n": args.n, "max_tokens": args.max_tokens,
            "posterior": {"reward": "sentiment", "beta": 0.1, "method": args.method,
                          **({"particles": args.particles} if args.particles else {})}}  # fmt: skip
    latencies, answered, failed, ids = [], {}, [], set()
    texts: dict[int, list[str]] = {}  # seed -> the choices' texts (with --seeded)

    async def client(c: int, http: httpx.AsyncClient):
        for r in range(args.requests):
            t0 = time.perf_counter()
            sent = {**body, "seed": c * args.requests + r} if args.seeded else body
            try:
                resp = await http.post("/v1/completions", json=sent)
            except httpx.HTTPError as e:
                failed.append(f"client {c} request {r}: {type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - t0)
            answered[(c, r)] = answered.get((c, r), 0) + 1
            if resp.status_code != 200 or len(resp.json()["choices"]) != args.n:
                failed.append(f"client {c} request {r}: {resp.status_code} {resp.text[:200]}")
            else:
                ids.add(resp.json()["id"])
                if args.seeded:
                    texts[sent["seed"]] = [ch["text"] for ch in resp.json()["choices"]]

    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(args.clients)))
        wall = time.perf_counter() - t0
    total = args.clients * args.requests
    once = len(answered) == total and all(v == 1 for v in answered.values()) and len(ids) == total
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"throughput": total / wall, "p50": q[49], "p99": q[98], "wall": wall, "once": once, "failed": failed, "texts": texts}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client, sent one after another")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--method", default="is")
    ap.add_argument("--prompt", default="The movie was")
    ap.add_argument("--rounds", type=int, default=1, help="alternations batched/serial; medians are printed")
    ap.add_argument("--model", default=None, help="model folder (default: the default prior, SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--seeded", action="store_true", help="every request carries its own seed (lm-eval sends one with each)")
    ap.add_argument("--particles", type=int, default=None, help="posterior.particles of each request (default: the server's, 16)")
    args = ap.parse_args()

    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for rnd in range(args.rounds):
        for mode in MODES:
            proc, url = None, None
            try:
                proc, url = start(args, mode)
                out = asyncio.run(load(url, args))
            finally:
                if proc is not None:
                    stop(proc)
            runs[mode].append(out)
            print(f"round {rnd + 1} {mode:8s}: {out['throughput']:.2f} req/s, p50 {out['p50']:.2f} s, p99 {out['p99']:.2f} s, "
                  f"wall {out['wall']:.1f} s, answered once: {out['once']}, failed: {len(out['failed'])}", flush=True)
            for f in out["failed"][:5]:
                print("   ", f)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("throughput", "p50", "p99")} for m, rs in runs.items()}
    print(f"\n{args.clients} clients x {args.requests} {'seeded ' if args.seeded else ''}requests, n={args.n}, "
          f"max_tokens={args.max_tokens}, method {args.method}, particles {args.particles or 'server default'}, "
          f"{args.rounds} round(s), medians:")
    for m, v in med.items():
        print(f"  {m:8s} throughput {v['throughput']:.2f} req/s   p50 {v['p50']:.2f} s   p99 {v['p99']:.2f} s")
    print(f"  batched / serial throughput: {med['batched']['throughput'] / med['serial']['throughput']:.2f}x")
    if args.seeded:  # a seed fixes its request's answer whatever it was batched with (per-prompt streams)
        answers = [r["texts"] for rs in runs.values() for r in rs]
        seeds = sorted(set.intersection(*(set(a) for a in answers)))
        same = sum(all(a[s] == answers[0][s] for a in answers) for s in seeds)
        print(f"  seeded answers identical in every run (batched and serial): {same} / {len(seeds)}")
    ok = all(r["once"] and not r["failed"] for rs in runs.values() for r in rs)
    print(f"  every request answered exactly once, none failed: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
