"""Wall time of the README's main command with one torch thread, torch's default (one per core)
and the command line's own choice (``posterior.threads.default_threads``), alternating runs in
one process so each configuration sees the same machine; prints the load before each run, the
median per configuration and the ratios.

    python bench/bench_threads.py [--repeats 3] [--configs 1,2,auto]

"1" and "2" set OMP_NUM_THREADS (torch obeys it; the CLI then leaves threads alone); "auto"
unsets it and POSTERIOR_THREADS, so the CLI picks. On a quiet machine "2" may win; on a loaded
one "1" wins by a wide margin (a thread waiting for a busy core stalls every product).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = ["sample", "The movie was", "--reward", "sentiment", "--beta", "0.1", "--method", "smc", "-n", "32",
           "--max-new-tokens", "32"]  # fmt: skip


def run(config: str) -> tuple[float, float, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "POSTERIOR_THREADS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if config != "auto":
        env["OMP_NUM_THREADS"] = config
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "posterior", *COMMAND], env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"config {config}: exit {out.returncode}: {out.stderr[-2000:]}")
    chosen = next((l for l in out.stderr.splitlines() if l.startswith("posterior: threads:")), "")
    return seconds, load, chosen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default="1,2,auto")
    args = ap.parse_args()
    configs = args.configs.split(",")
    times: dict[str, list[float]] = {c: [] for c in configs}
    print(f"{os.cpu_count()} cores, affinity {len(os.sched_getaffinity(0))}; command: posterior {' '.join(COMMAND)}")
    for r in range(args.repeats):
        for c in configs if r % 2 == 0 else configs[::-1]:
            seconds, load, chosen = run(c)
            times[c].append(seconds)
            print(f"round {r}: threads={c:>4}  {seconds:7.1f} s  (load before {load:.2f}) {chosen}", flush=True)
    med = {c: statistics.median(t) for c, t in times.items()}
    for c in configs:
        print(f"median threads={c:>4}: {med[c]:7.1f} s over {times[c]}")
    base = configs[0]
    for c in configs[1:]:
        print(f"ratio threads={c} / threads={base}: {med[c] / med[base]:.2f}")


if __name__ == "__main__":
    main()
