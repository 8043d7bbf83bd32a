#!/usr/bin/env bash
# The first run on a machine with an NVIDIA GPU, from a fresh checkout. Installs (or reuses) the venv with a CUDA
# build of torch, then checks, one line each (PASS / FAIL / SKIP and a number):
#   gpu      torch sees the GPU
#   tests    tests/test_cuda.py (-m cuda)
#   others   the other test files with CUDA cases (test_sampler.py, ...), whole
#   kernels  bench/kernels.py: the Triton kernels' bandwidth against the device's peak
#   engine   bench/engine.py --device cuda --concurrency 1,16,64 --no-profile
# Exits 1 if any check failed. Finishes in under 8 minutes: each step gets at most what is left of
# GPU_CHECK_SECONDS (470). Every step's whole output is kept in LOG_DIR.
#
#   bash scripts/gpu_check.sh
#   VENV=/tmp/gpu-venv TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

START=$SECONDS
BUDGET=${GPU_CHECK_SECONDS:-470}
export VENV=${VENV:-.venv}
export TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
export PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t meshserve-gpu-check.XXXXXX)}
mkdir -p "$LOG_DIR"
FAILED=0
PY=$VENV/bin/python
unset TRITON_INTERPRET # the benches must compile the kernels, not interpret them (the tests handle it themselves)

# step NAME SECONDS COMMAND...: COMMAND's output into LOG_DIR/NAME.log, killed after SECONDS or the time left.
step() {
    local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START)))
    shift 2
    if ((limit > left)); then limit=$left; fi
    if ((limit < 10)); then
        echo "no time left" >"$LOG_DIR/$name.log"
        return 125
    fi
    timeout --kill-after=10 "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
}

# report STATUS NAME DETAIL [RC]: one line; on FAIL the reason and the end of the step's log.
report() {
    printf '%-4s %-8s %s\n' "$1" "$2" "$3"
    if [[ $1 == FAIL ]]; then
        FAILED=1
        case ${4:-} in
            124 | 137) echo "       timed out; log: $LOG_DIR/$2.log" ;;
            125) echo "       not run: the $BUDGET s budget was spent" ;;
            *) tail -n 15 "$LOG_DIR/$2.log" 2>/dev/null | sed 's/^/       | /' ;;
        esac
    fi
}

install() {
    set -euo pipefail
    if [[ ! -x $PY ]]; then
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "$PYTHON: needs 3.11+" && return 1; }
        "$PYTHON" -m venv "$VENV"
    fi
    # As the README's test command; the test extra brings triton, pinned by constraints.txt to torch's own pin.
    "$PY" -m pip install -q -c constraints.txt -e '.[test]'
    # constraints.txt pins torch==2.13.0 exactly, so that the CPU machines install the 2.13.0+cpu wheel they keep on
    # disk (find-links): a local version satisfies ==2.13.0, and pip ranks 2.13.0+cpu above 2.13.0. So here too pip
    # may have installed (or kept) that CPU build. A GPU needs the CUDA build of the same version: PyPI's plain
    # 2.13.0 (its Linux wheel links CUDA through the nvidia-* packages), or TORCH_INDEX_URL's; `!=...+cpu` keeps
    # the wheel on disk from winning again.
    if ! "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
        local version
        version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
        echo "torch $version has no CUDA: installing its CUDA build"
        "$PY" -m pip uninstall -y -q torch
        "$PY" -m pip install -q -c constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
            "torch==$version,!=$version+cpu"
    fi
    "$PY" -c 'import sys, torch, triton
print("torch", torch.__version__, "CUDA", torch.version.cuda, "triton", triton.__version__)
sys.exit(torch.version.cuda is None)'
}
export -f install
export PY

# Each check: `step ... && rc=0 || rc=$?` (set -e must not end the script), then its line.
step install 300 bash -c install && rc=0 || rc=$?
if ((rc == 0)); then
    report PASS install "$(tail -n 1 "$LOG_DIR/install.log")"
else
    report FAIL install "pip install into $VENV" $rc
fi

probe='import torch; assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
p = torch.cuda.get_device_properties(0)
print(f"{torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, CUDA {torch.version.cuda}")'
step gpu 60 "$PY" -c "$probe" && rc=0 || rc=$?
if ((rc == 0)); then
    report PASS gpu "$(tail -n 1 "$LOG_DIR/gpu.log")"
else
    report FAIL gpu "torch does not see a GPU" $rc
fi

# pytest's last line: "40 passed, 6 skipped in 12.3s"
summary() { grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$LOG_DIR/$1.log" | tail -n 1 | sed 's/=//g; s/^ *//'; }
step tests 200 "$PY" -m pytest -q -m cuda tests/test_cuda.py && rc=0 || rc=$?
if ((rc == 0)) && grep -qE '[0-9]+ skipped' "$LOG_DIR/tests.log"; then
    report FAIL tests "tests/test_cuda.py: $(summary tests): skips on a GPU machine" 1
elif ((rc == 0)); then
    report PASS tests "tests/test_cuda.py: $(summary tests)"
else
    report FAIL tests "tests/test_cuda.py: $(summary tests)" $rc
fi
mapfile -t others < <(grep -l 'cuda.is_available' tests/test_*.py | grep -v '^tests/test_cuda.py$' || true)
if ((${#others[@]} == 0)); then
    report SKIP others "no other test file has CUDA cases"
else
    step others 120 "$PY" -m pytest -q "${others[@]}" && rc=0 || rc=$?
    if ((rc == 0)); then
        report PASS others "${others[*]#tests/}: $(summary others)"
    else
        report FAIL others "${others[*]#tests/}: $(summary others)" $rc
    fi
fi

step kernels 90 "$PY" bench/kernels.py && rc=0 || rc=$?
if ((rc == 0)); then
    # "decode attention (batch 32, context 1024)   12.3us   2345.6   49%" and "ratio (SDPA time / paged time): 1.23"
    decode=$(grep -m 1 '^decode attention (batch' "$LOG_DIR/kernels.log" |
        awk '{print $(NF-1) " GB/s, " $NF " of peak"}' || true)
    ratio=$(grep -m 1 '^ratio' "$LOG_DIR/kernels.log" | awk '{print $NF}' || true)
    report PASS kernels "decode attention ${decode:-?}; SDPA time / paged time ${ratio:-?} ($LOG_DIR/kernels.log)"
else
    report FAIL kernels "python bench/kernels.py" $rc
fi

# The fast path (CUDA graphs over the Triton kernels) against the transformers path and naive generate().
engine=(bench/engine.py --device cuda --concurrency 1,16,64 --no-profile)
step engine 240 "$PY" "${engine[@]}" && rc=0 || rc=$?
if ((rc == 0)); then
    # The row "        64 |    fast  TTFT | transformers  TTFT |  naive  TTFT |  3.1x  40.2x".
    row=$(awk -F'|' '$1 ~ /^ *64 *$/ {split($2, f, " "); split($3, t, " "); gsub(/^ +| +$/, "", $5);
        print f[1] " tok/s fast, " t[1] " transformers; fast/transformers fast/naive: " $5}' "$LOG_DIR/engine.log")
    report PASS engine "64 concurrent: ${row:-see the log} ($LOG_DIR/engine.log)"
else
    report FAIL engine "python ${engine[*]}" $rc
fi

echo "$((SECONDS - START)) s; logs in $LOG_DIR"
exit "$FAILED"
