#!/usr/bin/env bash
# GPU check (issue 15): bf16 LoRA on a SmolLM2-1.7B-shaped model and QLoRA (bitsandbytes 4-bit) on a
# Qwen2.5-0.5B-shaped one, 20 optimizer steps each; tokens/s, MFU and peak GPU memory as name=value.
# Run on a machine with one NVIDIA GPU, from anywhere:
#   bash bench/gpu_check.sh                 # about 5 minutes on an H100/H200, the install included
#   bash bench/gpu_check.sh --steps 50      # arguments go to bench/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); bench/gpu_check.py --plan runs without one" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
make install                                   # .venv with torch==2.13.0 (the CUDA build where a GPU is)
.venv/bin/pip install -q -e ".[gpu]"           # bitsandbytes for the QLoRA recipe
.venv/bin/python -c "import torch, bitsandbytes; assert torch.cuda.is_available(), 'torch has no CUDA: ' + torch.__version__"
timeout 300 .venv/bin/python bench/gpu_check.py "$@"
