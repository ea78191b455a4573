#!/usr/bin/env bash
# Full runs of the reproductions xiao-phase, huang-orthogonal, malach-tangent, geifman-laplace and
# geiger-scaling, one after the other, single-threaded; outputs in benchmarks/out/reproductions/NAME.
# Usage (repository root): bash benchmarks/run_reproductions_b.sh [MNIST_DIR] [UCI_DIR]
set -u
MNIST=${1:-../shared/data/mnist}
UCI=${2:-../shared/data/uci}
PY=${PYTHON:-python}
OUT=benchmarks/out/reproductions
mkdir -p "$OUT"
for spec in "xiao-phase:$MNIST" "huang-orthogonal:" "malach-tangent:" "geifman-laplace:$UCI" "geiger-scaling:$MNIST"; do
  name=${spec%%:*}; data=${spec#*:}
  args=(--out "$OUT/$name" --no-progress)
  [ -n "$data" ] && args+=(--data "$data")
  start=$(date +%s)
  OMP_NUM_THREADS=1 $PY -m ntkit.experiments.reproduce "$name" "${args[@]}" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc wall=$(( $(date +%s) - start ))s" | tee -a "$OUT/walltimes.txt"
done
