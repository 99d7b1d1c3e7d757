#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The README's main-job command: set up (idempotent), then run the demo. It builds a small
# random-weight model offline, serves it through vLLM's OpenAI server with and without
# KVOffloadConnector, asks about long documents in turn, and prints a TTFT table.
# Extra arguments go to scripts/demo.py (e.g. --docs 6 --doc-tokens 3000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$PWD/.cache/vllm}
echo "[demo] load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
exec "${VENV:-.venv}/bin/python" scripts/demo.py "$@"
