"""Time the Triton kernels against their torch references on a GPU (issue 5).

    python bench/bench_kernels.py                      # all kernels, peak bandwidth from the device name
    python bench/bench_kernels.py --peak-gbps 3350 --only tilted --repeats 50
    python bench/bench_kernels.py --only kv            # the KV-cache reorder hook (no kernel yet)

For each shape it prints the median time (CUDA events, after warm-up) of the kernel and of the torch
reference, the reference / kernel ratio (> 1: the kernel is faster), and the kernel's achieved
bandwidth as a fraction of the device's peak. Bytes are the minimum a fused kernel must move: every
input read once and every output written once (the normalise kernel in fact reads its row twice, the
resample kernel also writes and reads a float64 CDF workspace; neither is counted). Each timed call
includes the launcher's own work, device syncs included (the resample and tilted launchers sync once
to raise on bad rows, as the references do). Each row also checks the kernel against the reference.

Without CUDA it prints a message and exits 0: interpreter timings mean nothing. ``--smoke`` runs
every case once on tiny shapes on the CPU (with TRITON_INTERPRET=1) to check the script itself, and
``--compile-only 90`` compiles every kernel variant for sm_90 without a GPU (Triton's own ptxas)
and prints registers and spills per thread, which catches GPU-only compile errors early.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from functools import partial

import torch

# Peak HBM bandwidth in GB/s by device-name substring (vendor datasheets); --peak-gbps overrides.
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
             "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0, "A10G": 600.0}  # fmt: skip

NORMALIZE_SHAPES = [(64, 64), (256, 256), (1024, 1024), (4096, 1024)]  # (P, N)
TILTED_SHAPES = [(1024, 49152), (256, 151936)]  # (B, V): SmolLM2 and Qwen2.5 vocabularies
SPARSE_K = 64
DEVICE = "cuda"


def peak_gbps(name: str, override: float | None) -> tuple[float, str]:
    if override is not None:
        return override, "--peak-gbps"
    for key, value in PEAK_GBPS.items():
        if key in name:
            return value, f"datasheet value for {key!r}"
    raise SystemExit(f"unknown device {name!r}: pass --peak-gbps (e.g. 3350 for H100 SXM, 4800 for H200)")


def cuda_time_ms(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms between CUDA events, after ``warmup`` untimed calls."""
    if DEVICE == "cpu":  # --smoke: run once, time nothing
        fn()
        return float("nan")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Table:
    def __init__(self, peak: float, warmup: int, repeats: int):
        self.peak, self.warmup, self.repeats = peak, warmup, repeats
        print(f"{'kernel':<28}{'shape':>16}{'triton ms':>11}{'torch ms':>10}{'ratio':>8}{'GB/s':>8}{'of peak':>9}  check")

    def row(self, label: str, shape: str, nbytes: int, kernel: Callable, reference: Callable, check: str) -> None:
        t_k = cuda_time_ms(kernel, warmup=self.warmup, repeats=self.repeats)
        t_r = cuda_time_ms(reference, warmup=self.warmup, repeats=self.repeats)
        gbps = nbytes / (t_k * 1e-3) / 1e9
        print(f"{label:<28}{shape:>16}{t_k:>11.4f}{t_r:>10.4f}{t_r / t_k:>8.2f}{gbps:>8.0f}{gbps / self.peak:>9.1%}  {check}")


def bench_normalize(table: Table) -> None:
    from posterior.kernels import normalize_reference
    from posterior.kernels.normalize import normalize_triton

    for p, n in NORMALIZE_SHAPES:
        lw = 3.0 * torch.randn(p, n, device=DEVICE)
        got, want = normalize_triton(lw), normalize_reference(lw)
        err = (got.log_weights - want.log_weights).abs().max().item()
        ess_err = ((got.ess - want.ess).abs() / want.ess).max().item()
        nbytes = lw.numel() * 4 * 2 + p * (4 + 4 + 1)  # read + write (P, N) fp32, three (P,) outputs
        table.row("normalize fp32", f"{p}x{n}", nbytes, partial(normalize_triton, lw), partial(normalize_reference, lw),
                  f"max|dlw|={err:.1e} max rel dESS={ess_err:.1e}")  # fmt: skip


def bench_resample(table: Table) -> None:
    from posterior.kernels import resample_reference
    from posterior.kernels.resample import resample_triton

    for scheme in ("systematic", "stratified", "multinomial"):
        for p, n in NORMALIZE_SHAPES:
            lw = 3.0 * torch.randn(p, n, device=DEVICE)
            g = torch.Generator(device=DEVICE)
            got = resample_triton(lw, n, scheme, generator=g.manual_seed(0))
            want = resample_reference(lw, n, scheme, generator=g.manual_seed(0))
            differ = int((got != want).sum())
            u_bytes = p * 8 if scheme == "systematic" else p * n * 8
            nbytes = lw.numel() * 4 + u_bytes + p * n * 8  # log-weights, float64 uniforms, int64 ancestors
            table.row(f"resample {scheme}", f"{p}x{n}", nbytes,
                      partial(resample_triton, lw, n, scheme, generator=g),
                      partial(resample_reference, lw, n, scheme, generator=g),
                      f"{differ} of {got.numel()} ancestors differ (float ties)")  # fmt: skip


def bench_tilted(table: Table) -> None:
    from posterior.kernels import tilted_log_probs, tilted_sample_reference
    from posterior.kernels.tilted import tilted_sample_triton

    for b, v in TILTED_SHAPES:
        logits = (2.0 * torch.randn(b, v, device=DEVICE)).to(torch.bfloat16)
        dense = torch.randn(b, v, device=DEVICE).to(torch.bfloat16)
        cand = torch.topk(logits.float(), SPARSE_K, dim=-1).indices  # (B, k) the prior's top-k
        sparse = torch.randn(b, SPARSE_K, device=DEVICE)
        cases = [
            ("none", {}, 0),
            ("dense bf16", {"potential": dense}, b * v * 2),
            (f"sparse k={SPARSE_K}", {"potential": sparse, "candidates": cand}, b * SPARSE_K * (8 + 4)),
        ]
        for name, kwargs, extra in cases:
            g = torch.Generator(device=DEVICE).manual_seed(0)
            out = tilted_sample_triton(logits, beta=0.5, generator=g, **kwargs)
            log_q, log_norm = tilted_log_probs(logits, beta=0.5, **kwargs)
            err_q = (out.log_q - log_q.gather(1, out.tokens[:, None])[:, 0]).abs().max().item()
            err_n = (out.log_norm - log_norm).abs().max().item()
            log_q = None  # free the (B, V) table before timing
            nbytes = b * v * 2 + extra + b * (8 + 4 + 4)  # bf16 logits, potential, (B,) outputs
            table.row(f"tilted bf16 phi={name}", f"{b}x{v}", nbytes,
                      partial(tilted_sample_triton, logits, beta=0.5, generator=g, **kwargs),
                      partial(tilted_sample_reference, logits, beta=0.5, generator=g, **kwargs),
                      f"max|dlog_q|={err_q:.1e} max|dlog_norm|={err_n:.1e}")  # fmt: skip
        torch.cuda.empty_cache()


def bench_kv_reorder(table: Table, shape: tuple[int, ...]) -> None:
    """The hook for the deferred KV-cache reorder kernel (kernels/README.md): gather a cache along
    its batch axis by ancestors with ``torch.index_select``, against a plain copy of the same bytes.
    A kernel is worth writing only if the gather falls well short of the copy and shows up in a
    decoding profile."""
    b = shape[2]
    cache = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)  # (L, 2, B, H, T, D)
    out = torch.empty_like(cache)
    ancestors = torch.randint(0, b, (b,), device=DEVICE)  # (B,)
    nbytes = 2 * cache.numel() * cache.element_size()  # read + write
    t_gather = cuda_time_ms(partial(torch.index_select, cache, 2, ancestors, out=out), warmup=table.warmup, repeats=table.repeats)
    t_copy = cuda_time_ms(partial(out.copy_, cache), warmup=table.warmup, repeats=table.repeats)
    print(f"\nKV reorder, cache {'x'.join(map(str, shape))} bf16 ({nbytes / 2 / 1e9:.2f} GB), gather along B:")
    for label, ms in (("torch.index_select", t_gather), ("copy of the same bytes", t_copy)):
        gbps = nbytes / (ms * 1e-3) / 1e9
        print(f"  {label:<24}{ms:>9.3f} ms{gbps:>8.0f} GB/s{gbps / table.peak:>7.1%} of peak")
    print(f"  index_select reaches {t_copy / t_gather:.1%} of the copy's bandwidth")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peak-gbps", type=float, default=None, help="device peak bandwidth, GB/s")
    parser.add_argument("--only", choices=["normalize", "resample", "tilted", "kv"], action="append")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--kv-shape", type=int, nargs=6, default=[30, 2, 32, 3, 512, 64],
                        metavar=("L", "TWO", "B", "H", "T", "D"), help="KV cache (layers, 2, B, H, T, D), bf16")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, once each: checks the script")
    parser.add_argument("--compile-only", type=int, metavar="SM", help="compile for sm_SM (e.g. 90) without a GPU")
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke(args)
    if args.compile_only:
        return compile_only(args.compile_only)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; the kernels are timed only on a GPU (TRITON_INTERPRET "
              "timings are meaningless). Nothing to do.")
        return 0
    from posterior.kernels import HAS_TRITON

    if not HAS_TRITON:
        print("bench_kernels: triton is not installed; nothing to time.")
        return 0
    name = torch.cuda.get_device_name()
    peak, source = peak_gbps(name, args.peak_gbps)
    print(f"device: {name}; peak bandwidth {peak:.0f} GB/s ({source}); median of {args.repeats} after {args.warmup} warm-up")
    table = Table(peak, args.warmup, args.repeats)
    only = set(args.only or ["normalize", "resample", "tilted", "kv"])
    torch.manual_seed(0)
    if "normalize" in only:
        bench_normalize(table)
    if "resample" in only:
        bench_resample(table)
    if "tilted" in only:
        bench_tilted(table)
    if "kv" in only:
        bench_kv_reorder(table, tuple(args.kv_shape))  # last: prints its own lines
    return 0


def smoke(args: argparse.Namespace) -> int:
    """Every case once on tiny CPU shapes through the Triton interpreter (no timings)."""
    global DEVICE, NORMALIZE_SHAPES, TILTED_SHAPES, SPARSE_K
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke needs TRITON_INTERPRET=1 in the environment")
    DEVICE, NORMALIZE_SHAPES, TILTED_SHAPES, SPARSE_K = "cpu", [(3, 40)], [(2, 300)], 5
    table = Table(1.0, 0, 1)
    bench_normalize(table)
    bench_resample(table)
    bench_tilted(table)
    bench_kv_reorder(table, (2, 2, 3, 2, 5, 4))
    return 0


def compile_only(sm: int) -> int:
    """Compile each kernel at its default tiles for sm_``sm`` (no GPU needed); print resource usage."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from posterior.kernels._common import num_warps
    from posterior.kernels.normalize import MAX_BLOCK_N, _normalize_kernel
    from posterior.kernels.resample import MAX_BLOCK_M, _resample_kernel
    from posterior.kernels.tilted import MAX_BLOCK_V, _tilted_kernel

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    i32 = "i32"
    cases = []
    for x in ("fp32", "bf16", "fp64"):
        out = "fp64" if x == "fp64" else "fp32"
        sig = {"x_ptr": f"*{x}", "out_ptr": f"*{out}", "ess_ptr": f"*{out}", "log_mean_ptr": f"*{out}",
               "degenerate_ptr": "*i1", "N": i32, "stride_x": i32, "stride_out": i32}  # fmt: skip
        cases.append((f"normalize {x}", _normalize_kernel, sig, {"BLOCK": MAX_BLOCK_N}, True, MAX_BLOCK_N))
        for scheme in (0, 1, 2):
            sig = {"lw_ptr": f"*{x}", "u_ptr": "*fp64", "cdf_ptr": "*fp64", "out_ptr": "*i64", "status_ptr": "*i32",
                   "N": i32, "M": i32, "n_steps": i32, "stride_lw": i32, "stride_u": i32}  # fmt: skip
            consts = {"SCHEME": scheme, "BLOCK_N": MAX_BLOCK_N, "BLOCK_M": MAX_BLOCK_M}
            cases.append((f"resample {x} scheme={scheme}", _resample_kernel, sig, consts, False, MAX_BLOCK_N))
    for x in ("fp32", "bf16"):
        for phi in (0, 1, 2):
            sig = {"logits_ptr": f"*{x}", "pot_ptr": f"*{x}", "cand_ptr": "*i32", "seed_ptr": "*i64",
                   "tokens_ptr": "*i64", "log_q_ptr": "*fp32", "log_norm_ptr": "*fp32", "status_ptr": "*i32",
                   "V": i32, "K": i32, "stride_logits": i32, "stride_pot": i32, "stride_cand": i32,
                   "inv_temperature": "fp32", "inv_beta": "fp32"}  # fmt: skip
            consts = {"PHI": phi, "BLOCK_V": MAX_BLOCK_V, "BLOCK_K": 64}
            cases.append((f"tilted {x} phi={phi}", _tilted_kernel, sig, consts, True, MAX_BLOCK_V))
    failed = 0
    for label, fn, sig, consts, fusion, block in cases:
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", sm, 32),
                                    options={"num_warps": num_warps(block), "enable_fp_fusion": fusion})  # fmt: skip
        except Exception as e:  # noqa: BLE001  (report every variant, then fail)
            failed += 1
            print(f"{label:<32} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False).stdout
        found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        regs, _, shared, local = found.groups() if found else ("?",) * 4
        print(f"{label:<32} sm_{sm} ok: {regs} registers, {local} B local (spills), {shared} B shared")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
