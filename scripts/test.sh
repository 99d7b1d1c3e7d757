#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export KV_OFFLOAD_REQUIRE_VLLM=${KV_OFFLOAD_REQUIRE_VLLM:-1}
export KV_OFFLOAD_REQUIRE_STORES=${KV_OFFLOAD_REQUIRE_STORES:-1}
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$PWD/.cache/vllm}
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
