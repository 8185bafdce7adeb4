#!/usr/bin/env bash
# The GPU benchmarks, as one prepared script for a lent GPU machine (the `device` tool) or any CUDA
# host with the project installed: the training throughput of the default spec against plain TRL
# and LlamaFactory (LoRA, full, QLoRA, DPO; bf16, flash-attn and Liger when installed, which the
# default spec then selects itself) and the serving benchmark (plain vLLM, kubetune's vLLM engine,
# the transformers engine; bf16; vLLM sizing its own KV cache) at 1, 4, 16 and 64 streams.
# Results land in bench/results/gpu-<device>/ with the device named (nvidia-smi), so the CPU results
# beside them are never overwritten.
#
#   bash bench/gpu.sh                # ~20 minutes on one H100
#   QUICK=1 bash bench/gpu.sh        # one round, LoRA SFT and 1/4/16 streams
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd '[:alnum:]-')
OUT="bench/results/gpu-${DEVICE:-unknown}"
mkdir -p "$OUT"
export KUBETUNE_BENCH_RESULTS="$OUT"  # both scripts write their JSON/Markdown/PNG there
nvidia-smi > "$OUT/nvidia-smi.txt"
"$PY" -c "import torch, importlib.util as u; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0));
print({m: u.find_spec(m) is not None for m in ('flash_attn', 'liger_kernel', 'vllm', 'bitsandbytes')})" | tee "$OUT/environment.txt"

quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
# Training: a model big enough for a GPU to matter (hidden 2048 x 16 layers, ~1B with the vocab).
"$PY" bench/throughput.py "${quick[@]}" --hidden 2048 --layers 16 --rows 800 \
  --methods "${METHODS:-lora,full,qlora,dpo}" 2>&1 | tee "$OUT/throughput.log"
# Serving: the same model shape, bf16, vLLM's default KV sizing; KUBETUNE_VLLM_PYTHON may name a
# separate vLLM venv (default: the project's interpreter, which has the CUDA build of vLLM here).
export KUBETUNE_VLLM_PYTHON="${KUBETUNE_VLLM_PYTHON:-$(command -v "$PY")}"
"$PY" bench/serve.py "${quick[@]}" --hidden 2048 --layers 16 --dtype bfloat16 --kv-cache-gib 0 \
  --max-model-len 2048 --threads 8 2>&1 | tee "$OUT/serve.log"
echo "GPU results in $OUT"
