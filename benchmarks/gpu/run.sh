#!/usr/bin/env bash
# One-shot GPU check, for the day a GPU is lent: compiled kernels against the torch path,
# decode attention bandwidth, engine throughput on a random-weight Llama-3-8B-shaped model.
#
#   bash benchmarks/gpu/run.sh [--dry-run] [--quick]
#
# Runs with the machine's own python (PYTHON, default python3) and the packages' sources on
# PYTHONPATH: no network, no installs, no project environment needed (torch, triton and, for
# the engine step, xxhash must be importable). Results go under $OUT when it is set, else
# benchmarks/results/gpu/. Each step has a time limit; all of them together stay under
# 8 minutes on one H100/H200. A failed step is reported and the next one still runs; the exit
# status is 1 if any step failed. --dry-run prints the steps without running anything.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/benchmarks/gpu"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/benchmarks/results/gpu}"
DRY=0
QUICK=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --quick) QUICK=(--quick) ;;
        -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown argument: $arg (use --dry-run, --quick)" >&2; exit 2 ;;
    esac
done

export PYTHONPATH="$ROOT/packages/kvquant/src:$ROOT/packages/prefix-index/src:$ROOT/packages/paged-engine/src${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# name | time limit (s) | command
STEPS=(
    "env|30|$PY $HERE/env_report.py"
    "kernel-check|90|$PY $HERE/kernel_check.py --out $OUT ${QUICK[*]:-}"
    "pytest-matrix|120|$PY -m pytest $ROOT/packages/kvquant/tests/test_triton.py -m 'slow or not slow' -q -p no:cacheprovider"
    "decode-bench|60|$PY $HERE/decode_bench.py --out $OUT ${QUICK[*]:-}"
    "engine-bench|150|$PY $HERE/engine_bench.py --out $OUT ${QUICK[*]:-}"
)

if [[ $DRY == 1 ]]; then
    echo "would write results under $OUT, with PYTHONPATH=$PYTHONPATH"
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit cmd <<<"$step"
        printf '%-14s limit %4ss: %s\n' "$name" "$limit" "$cmd"
    done
    exit 0
fi

mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
status=0
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    log="$OUT/$name.log"
    if [[ $name == pytest-matrix ]] && ! "$PY" -c "import pytest" 2>/dev/null; then
        echo "$name: skipped (pytest is not installed; kernel-check covers the kernels)" | tee -a "$SUMMARY"
        continue
    fi
    if [[ $name == engine-bench ]] && ! "$PY" -c "import xxhash" 2>/dev/null; then
        echo "$name: skipped (xxhash is not installed: the engine's prefix index needs it)" | tee -a "$SUMMARY"
        continue
    fi
    printf '\n==> %s (limit %ss)\n' "$name" "$limit"
    start=$SECONDS
    (cd "$ROOT" && timeout --kill-after=10 "$limit" bash -c "$cmd") >"$log" 2>&1
    rc=$?
    tail -n 25 "$log"
    if [[ $rc == 0 ]]; then verdict=ok; elif [[ $rc == 124 || $rc == 137 ]]; then verdict="TIMED OUT"; else verdict="FAILED (exit $rc)"; fi
    [[ $rc == 0 ]] || status=1
    echo "$name: $verdict in $((SECONDS - start)) s, log $log" | tee -a "$SUMMARY"
done
printf '\n==> summary (%s)\n' "$SUMMARY"
cat "$SUMMARY"
exit $status
