#!/bin/bash
# A tiny run on CPU nodes: tiny-opt with random weights on tests/data/tiny.jsonl, 2 ranks (gloo).
# It checks the Slurm path end to end in a minute (the tests submit it to a local Slurm).
# Submit from the repository root:   OUTPUT_ROOT=$PWD/runs sbatch slurm/tiny.sh
# With a saved tiny model:           python -m wpn_dist.tiny_model --out /shared/tiny-opt
#                                    MODEL=/shared/tiny-opt OUTPUT_ROOT=$PWD/runs sbatch slurm/tiny.sh
# Preview without Slurm:             WPN_DIST_DRY_RUN=1 OUTPUT_ROOT=$PWD/runs bash slurm/tiny.sh
#SBATCH --job-name=wpn-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

: "${DS_ACCELERATOR:=cpu}"
export DS_ACCELERATOR
: "${MODEL:=tiny-opt}"
# The tiny specs have no weights of their own: random ones. Anything else (a directory saved by
# `python -m wpn_dist.tiny_model`, a hub id) is loaded as a pretrained model.
case $MODEL in
    tiny-opt | tiny-gpt-neo | mini-opt) : "${MODEL_INIT:=random}" ;;
    *) : "${MODEL_INIT:=pretrained}" ;;
esac
: "${DATA:=tests/data/tiny.jsonl}"
: "${DS_CONFIG:=zero3}"
: "${PRECISION:=fp32}"
: "${MICRO_BATCH_SIZE:=2}"
: "${ACTIVATION_CHECKPOINTING:=false}"
: "${STEPS:=8}"
: "${LR:=1e-3}"
: "${SAVE_EVERY:=3}"
: "${LOG_EVERY:=1}"
: "${EXPORT_HF:=false}"

# Find the checkout (sbatch runs a copy of this file from Slurm's spool directory, so "$0" does not
# tell): $WPN_DIST_ROOT, else this file's ../ (`bash slurm/x.sh`), else the directory sbatch ran in.
for WPN_DIST_ROOT in "${WPN_DIST_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [ -f "$WPN_DIST_ROOT/slurm/common.sh" ] && break
done
source "$WPN_DIST_ROOT/slurm/common.sh" || { echo "cannot find slurm/common.sh: sbatch from the repository root or set WPN_DIST_ROOT" >&2; exit 2; }
