#!/usr/bin/env bash
# One GPU check for a lent machine (under 8 minutes): the kernel tests at real Qwen3-4B shapes on
# CUDA, the three benchmarks (vhack bench), then the whole kernel test suite on CUDA tensors
# (VHACK_TEST_CUDA=1) in the time left. Writes everything under $OUT/gpu_check-<UTC time>/ when OUT is
# set, else bench/results/gpu_check-<UTC time>/: env.json (device, driver, versions, date, commit),
# one log per step, pytest junit XML, the benchmarks' JSON and plots, and summary.txt (status and
# seconds per step). Every step has its own time limit and the whole run a deadline, so a hung step
# cannot eat the machine; a failed step does not stop the later ones (their numbers still help).
#
#   bash bench/gpu_check.sh            # exit 0: every step passed; 1: a step failed or timed out;
#                                      # 2: no usable CUDA device or vhack not installable
# Environment: PYTHON (default python), OUT, GPU_CHECK_BUDGET_S (default 465 seconds: with the
# 15 s a timed-out step gets to exit, the run ends within 8 minutes).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
BUDGET_S=${GPU_CHECK_BUDGET_S:-465}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS="${OUT:-bench/results}/gpu_check-${STAMP}"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
START=$SECONDS
FAILED=0

note() { echo "[gpu_check $((SECONDS - START))s] $*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S CMD...: run CMD with a limit of min(LIMIT_S, time left), log to NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 20)); then
    note "SKIP    $name (budget of ${BUDGET_S}s spent)"
    FAILED=1
    return 0
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS rc=0
  note "START   $name (limit ${limit}s)"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$RESULTS/$name.log" 2>&1 || rc=$?
  if ((rc == 0)); then
    note "PASS    $name ($((SECONDS - t0))s)"
  else
    FAILED=1
    if ((rc == 124 || rc == 137)); then
      note "TIMEOUT $name after $((SECONDS - t0))s (limit ${limit}s); tail of $name.log:"
    else
      note "FAIL    $name (exit $rc, $((SECONDS - t0))s); tail of $name.log:"
    fi
    tail -n 15 "$RESULTS/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  fi
}

note "results in $RESULTS"

# ---- setup: the package (with its C++ extension) and a CUDA device ----------------------------
if ! "$PY" -c "import vhack, pytest, hypothesis" >/dev/null 2>&1; then
  note "vhack (or the test tools) not importable: pip install --no-build-isolation -e .[dev]"
  if ! timeout 300 "$PY" -m pip install -q --no-build-isolation -e ".[dev]" \
    >"$RESULTS/install.log" 2>&1; then
    note "install failed; tail of install.log:"
    tail -n 20 "$RESULTS/install.log" | tee -a "$SUMMARY"
    exit 2
  fi
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "torch sees no CUDA device: this script is for a GPU machine"
  exit 2
fi
nvidia-smi >"$RESULTS/nvidia-smi.txt" 2>&1 || true
"$PY" - "$RESULTS/env.json" <<'PYEOF'
import json, subprocess, sys
sys.path.insert(0, "bench")
import common
import torch

env = common.environment(torch.device("cuda"))
env["capability"] = list(torch.cuda.get_device_capability())
env["date_utc"] = subprocess.run(["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"], capture_output=True,
                                 text=True).stdout.strip()
try:
    env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                   check=True).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    env["commit"] = None
json.dump(env, open(sys.argv[1], "w"), indent=2, default=str)
print(f"{env['device']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}")
PYEOF
note "$("$PY" -c "import json; e = json.load(open('$RESULTS/env.json')); print(e['device'], 'torch', e['torch'], 'triton', e['triton'], 'cuda', e['cuda'])")"

# ---- steps, most informative per second first; the broad kernel suite takes what time is left ---
# The test selection; tests/test_gpu_check_script.py collects exactly these on a CPU machine.
REAL_SHAPE_TESTS=(tests/test_gpu_shapes.py)
KERNEL_TESTS=(tests/test_project_kernels.py tests/test_svd_linear_kernels.py
  tests/test_svd_linear_training.py tests/test_projector.py)
step tests_qwen3_4b_shapes 90 env VHACK_TEST_CUDA=1 "$PY" -m pytest "${REAL_SHAPE_TESTS[@]}" -q \
  -p no:cacheprovider --junitxml="$RESULTS/tests_qwen3_4b_shapes.xml"
# The benchmarks, through `vhack bench` (one per step, so each keeps its own time limit): each
# writes its JSON and plot, and a summary bench-<name>-<device>-<date>.json/.png with the ratios,
# the load and the comparison with bench/results. They print PASS/MISS against their targets and
# never assert. project: k = 12 only (its CUDA target; each k costs two torch.compile runs of a
# 252-module loop). svd_linear: --no-compile (the compiled eager path is for a full run).
step bench_project 130 "$PY" -m vhack.cli bench --only project --device cuda --ks 12 --reps 10 \
  --out-dir "$RESULTS"
step bench_svd_linear 90 "$PY" -m vhack.cli bench --only svd_linear --device cuda --reps 10 \
  --no-compile --out-dir "$RESULTS"
step bench_extract 40 "$PY" -m vhack.cli bench --only extract --device cuda --reps 3 \
  --out-dir "$RESULTS"
step tests_kernels 150 env VHACK_TEST_CUDA=1 "$PY" -m pytest "${KERNEL_TESTS[@]}" -q \
  -m "not slow" -p no:cacheprovider --junitxml="$RESULTS/tests_kernels.xml"

note "done in $((SECONDS - START))s: $([[ $FAILED == 0 ]] && echo 'all steps passed' || echo 'FAILURES above')"
exit "$FAILED"
