#!/usr/bin/env bash
# One part of the scaling study on the lent GPU machine (see ../shared/gpu/README.md and
# docs/benchmarks.md): installs the carried wheels (.whl, built here by ../shared/gpu/prepare-wheels.sh),
# runs `python3 -m wpn_dist.scaling --out runs/scaling-gpu "$@"` under a time limit, and copies the
# outputs to $OUT. runs/ is ignored by git, so on a warm machine the rows stay between calls and a
# rerun skips the points already done.
#
#   bash scripts/gpu-scaling.sh --preset gpu-opt1.3b --time_budget_s 540      (carry: [".whl"])
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout "${LIMIT_S:-580}" python3 -m wpn_dist.scaling --out runs/scaling-gpu "$@"
status=$?
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  for f in rows.jsonl results.csv projected.csv vs_model_size.png vs_negatives.png memory_vs_stage.png; do
    [ -f "runs/scaling-gpu/$f" ] && cp "runs/scaling-gpu/$f" "$OUT/"
  done
  [ -d runs/scaling-gpu/logs ] && tar -czf "$OUT/logs.tar.gz" -C runs/scaling-gpu logs
fi
exit $status
