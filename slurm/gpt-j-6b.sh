#!/bin/bash
# WPN unlearning of gpt-j-6b under DeepSpeed ZeRO-3: 1 node(s) x 8 GPUs = 8 ranks, one Slurm task per GPU.
# Submit from the repository root:   DATA=my_rows.jsonl OUTPUT_ROOT=/shared/runs sbatch slurm/gpt-j-6b.sh
# Preview without Slurm:             WPN_DIST_DRY_RUN=1 DATA=my_rows.jsonl OUTPUT_ROOT=/shared/runs bash slurm/gpt-j-6b.sh
# Knobs and the design: slurm/README.md. Command-line sbatch options override the lines below.
#SBATCH --job-name=wpn-gpt-j-6b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# Defaults for this model (80 GiB GPUs; see `python -m wpn_dist.memory --model gpt-j-6b --nodes 1 --gpus-per-node 8`).
# With fewer nodes or smaller GPUs: DS_CONFIG=zero3_offload, a smaller MICRO_BATCH_SIZE, ACTIVATION_CHECKPOINTING=true.
: "${MODEL:=gpt-j-6b}"
: "${DS_CONFIG:=zero3}"
: "${PRECISION:=bf16}"
: "${MICRO_BATCH_SIZE:=4}"
: "${ACTIVATION_CHECKPOINTING:=false}"
: "${SAVE_EVERY:=50}"

# Find the checkout (sbatch runs a copy of this file from Slurm's spool directory, so "$0" does not
# tell): $WPN_DIST_ROOT, else this file's ../ (`bash slurm/x.sh`), else the directory sbatch ran in.
for WPN_DIST_ROOT in "${WPN_DIST_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [ -f "$WPN_DIST_ROOT/slurm/common.sh" ] && break
done
source "$WPN_DIST_ROOT/slurm/common.sh" || { echo "cannot find slurm/common.sh: sbatch from the repository root or set WPN_DIST_ROOT" >&2; exit 2; }
