#!/usr/bin/env bash
# GPU check (issue 15): bf16 LoRA on a SmolLM2-1.7B-shaped model and QLoRA (bitsandbytes 4-bit) on a
# Qwen2.5-0.5B-shaped one, 40 optimizer steps each; tokens/s, MFU and peak GPU memory as name=value.
# Run on a machine with one NVIDIA GPU, from anywhere:
#   bash bench/gpu_check.sh                 # about 5 minutes on an H100/H200, the install included
#   bash bench/gpu_check.sh --steps 50      # arguments go to bench/gpu_check.py
# A GPU machine with no network (no package index, no hub) runs on its own python3, which must have torch with
# CUDA; what it lacks comes in a bundle that a connected machine with the full install prepares (no GPU needed):
#   bash bench/gpu_check.sh --prepare       # here: .gpu-bundle/ = wheels + tokenizer + contract-checked data (~50 MB)
#   bash bench/gpu_check.sh --offline       # there, with .gpu-bundle/ copied beside the code
set -euo pipefail
cd "$(dirname "$0")/.."
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
BUNDLE=.gpu-bundle
# What the offline machine's python3 gets from the bundle: these, at this project's versions (read from .venv), and
# everything they need except torch and torch's own dependencies, which are the machine's (its CUDA build).
TOP=(transformers peft pydantic)
MACHINE_OWN='^(torch|triton|nvidia-.*|numpy|sympy|mpmath|networkx|jinja2|markupsafe|filelock|fsspec|setuptools)$'
PLATFORM=(--only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)

if [[ "${1:-}" == "--prepare" ]]; then
  shift
  make install
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels"
  specs=("bitsandbytes>=0.50")                    # pyproject's [gpu] extra (not installed here)
  for pkg in "${TOP[@]}"; do
    specs+=("$pkg==$(.venv/bin/python -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$pkg")")
  done
  .venv/bin/pip install -q --dry-run --ignore-installed --target "$BUNDLE/resolve" --report "$BUNDLE/resolve.json" \
    "${PLATFORM[@]}" "${specs[@]}"
  .venv/bin/python -c '
import json, re, sys
for item in json.load(open(sys.argv[1]))["install"]:
    name = item["metadata"]["name"].lower().replace("_", "-")
    if not re.match(sys.argv[2], name):
        print(name + "==" + item["metadata"]["version"])' "$BUNDLE/resolve.json" "$MACHINE_OWN" > "$BUNDLE/wheels.txt"
  .venv/bin/pip download -q --no-deps "${PLATFORM[@]}" -d "$BUNDLE/wheels" -r "$BUNDLE/wheels.txt"
  # bitsandbytes ships a library per CUDA version (43 MB); keep those of CUDA 12.8 and later
  .venv/bin/python bench/slim_wheel.py "$BUNDLE"/wheels/bitsandbytes-*.whl \
    'bitsandbytes/libbitsandbytes_(cuda11[0-9]|cuda12[0-7]|rocm|xpu).*\.so'
  .venv/bin/python bench/gpu_check.py --prepare "$BUNDLE" "$@"
  du -sh "$BUNDLE"
  exit 0
fi

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); bench/gpu_check.py --plan runs without one" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [[ "${1:-}" == "--offline" ]]; then
  shift
  [[ -d "$BUNDLE/wheels" ]] || { echo "gpu_check --offline: no $BUNDLE/ here; run 'bash bench/gpu_check.sh --prepare' on a connected machine" >&2; exit 2; }
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$BUNDLE"/wheels/*.whl
  export PYTHONPATH="$SITE:$PWD"
  PYTHON=python3
  set -- --bundle "$BUNDLE" "$@"
else
  make install                                   # .venv with torch==2.13.0 (the CUDA build where a GPU is)
  .venv/bin/pip install -q -e ".[gpu]"           # bitsandbytes for the QLoRA recipe
  PYTHON=.venv/bin/python
fi
$PYTHON -c "import torch, transformers, peft, bitsandbytes; assert torch.cuda.is_available(), 'torch has no CUDA: ' + torch.__version__
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
timeout 300 $PYTHON bench/gpu_check.py "$@"
