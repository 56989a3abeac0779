# shellcheck shell=bash
# Shared logic of the slurm/*.sh job templates; they source this file after their #SBATCH lines and
# model defaults. One Slurm task per GPU: `srun` starts `python wpn_dist/train.py` once per rank (no
# deepspeed launcher inside the job); wpn_dist.app.distributed.init() reads the rank from SLURM_PROCID,
# SLURM_LOCALID and SLURM_NTASKS. See slurm/README.md.
#
# Knobs (environment variables; sbatch passes the submitting shell's environment to the job):
#   MODEL, MODEL_INIT (pretrained), DATA (PKU-Alignment/PKU-SafeRLHF), DATA_FORMAT (pku for a hub
#   name "org/name", else auto), DS_CONFIG (zero3), PRECISION (bf16), MICRO_BATCH_SIZE, GRAD_ACCUM (1),
#   ACTIVATION_CHECKPOINTING (true), STEPS (the trainer's default), LR (the trainer's default),
#   SAVE_EVERY (50), OUTPUT_ROOT (runs), OUTPUT_DIR ($OUTPUT_ROOT/$SLURM_JOB_NAME-$SLURM_JOB_ID),
#   EXTRA_ARGS (more trainer options, split on whitespace; they come last, so they override the others),
#   PYTHON (python3), SRUN_ARGS (more srun options), SRUN_WAIT (30: seconds the other ranks may run on
#   after one has ended), WPN_DIST_MASTER_ADDR / WPN_DIST_MASTER_PORT (override the rendezvous),
#   WPN_DIST_REQUEUE (1: requeue on a stop signal; 0: exit 99 instead),
#   WPN_DIST_DRY_RUN=1 (print what would run; no Slurm needed), WPN_DIST_HOSTS (dry run: host names).

set -eo pipefail

STOPPED_EXIT_CODE=99  # wpn_dist/train.py: stopped on SIGUSR1/SIGTERM after saving a checkpoint

wpn_log() { echo "wpn_dist/slurm: $*" >&2; }
wpn_die() { wpn_log "error: $*"; exit 2; }

# Expand a Slurm hostlist ("gpu[001-003,7],login1" -> one name per line) without Slurm: for dry
# runs, where `scontrol show hostnames` may be missing or have no slurm.conf.
wpn_expand_hostlist() {
    local list=$1 item="" depth=0 c i
    for ((i = 0; i < ${#list}; i++)); do
        c=${list:i:1}
        case $c in
            "[") depth=$((depth + 1)) ;;
            "]") depth=$((depth - 1)) ;;
        esac
        if [[ $c == "," && $depth -eq 0 ]]; then
            _wpn_expand_item "$item"
            item=""
        else
            item+=$c
        fi
    done
    [[ -n $item ]] && _wpn_expand_item "$item"
    return 0
}

_wpn_expand_item() {
    local item=$1
    if [[ $item != *"["* ]]; then
        echo "$item"
        return
    fi
    local prefix=${item%%\[*} rest=${item#*\[}
    local ranges=${rest%%\]*} suffix=${rest#*\]} range lo hi n width
    local IFS=,
    for range in $ranges; do
        lo=${range%-*} hi=${range#*-}
        width=${#lo}
        for ((n = 10#$lo; n <= 10#$hi; n++)); do
            _wpn_expand_item "$prefix$(printf "%0${width}d" "$n")$suffix"
        done
    done
}

# Node counts per node from SLURM_TASKS_PER_NODE ("8(x8)" or "2(x3),1") -> one count per line.
wpn_tasks_per_node() {
    local part count reps
    local IFS=,
    for part in $1; do
        if [[ $part =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            count=${BASH_REMATCH[1]} reps=${BASH_REMATCH[2]}
        else
            count=$part reps=1
        fi
        for ((; reps > 0; reps--)); do echo "$count"; done
    done
}

# The value of an #SBATCH option in a script ("--nodes=8", "--nodes 8", "-N 8"); empty if absent.
wpn_sbatch_option() {
    local file=$1 long=$2 short=${3:-} line
    [[ -r $file ]] || return 0
    while IFS= read -r line; do
        [[ $line == "#SBATCH"* ]] || continue
        line=${line#\#SBATCH}
        line=${line%%#*}
        if [[ $line =~ (^|[[:space:]])--${long}[=[:space:]]+([^[:space:]]+) ]] ||
            [[ -n $short && $line =~ (^|[[:space:]])-${short}[=[:space:]]*([^[:space:]]+) ]]; then
            echo "${BASH_REMATCH[2]}"
        fi
    done <"$file" | tail -n 1
}

# tests/test_slurm.py sources this file for the functions above only.
[[ ${WPN_DIST_FUNCTIONS_ONLY:-0} == 1 ]] && return 0

# --- where we are ------------------------------------------------------------------------------------
WPN_TEMPLATE=$(realpath "$0" 2>/dev/null || echo "$0")  # the job script (under sbatch: Slurm's copy of it)
[[ -n ${WPN_DIST_ROOT:-} && -f $WPN_DIST_ROOT/wpn_dist/train.py ]] ||
    wpn_die "cannot find the wpn_dist checkout (WPN_DIST_ROOT=${WPN_DIST_ROOT:-unset}); run sbatch from the repository root or set WPN_DIST_ROOT"
WPN_DIST_ROOT=$(cd "$WPN_DIST_ROOT" && pwd)
cd "$WPN_DIST_ROOT"
DRY_RUN=${WPN_DIST_DRY_RUN:-0}

if [[ $DRY_RUN == 1 ]]; then
    # Outside Slurm the #SBATCH lines are comments: take the allocation from them (the SLURM_*
    # variables, when given, win), and invent a job id and host names.
    template=$WPN_TEMPLATE
    : "${SLURM_JOB_ID:=12345}"
    : "${SLURM_JOB_NAME:=$(wpn_sbatch_option "$template" job-name J)}"
    : "${SLURM_JOB_NAME:=$(basename "$template" .sh)}"
    : "${SLURM_JOB_NUM_NODES:=${SLURM_NNODES:-$(wpn_sbatch_option "$template" nodes N)}}"
    : "${SLURM_JOB_NUM_NODES:=1}"
    : "${SLURM_NTASKS_PER_NODE:=$(wpn_sbatch_option "$template" ntasks-per-node)}"
    : "${SLURM_CPUS_PER_TASK:=$(wpn_sbatch_option "$template" cpus-per-task c)}"
    [[ -n $SLURM_CPUS_PER_TASK ]] || unset SLURM_CPUS_PER_TASK
    if [[ -z ${SLURM_TASKS_PER_NODE:-} ]]; then
        [[ -n $SLURM_NTASKS_PER_NODE ]] || SLURM_NTASKS_PER_NODE=$(( ${SLURM_NTASKS:-1} / SLURM_JOB_NUM_NODES ))
        SLURM_TASKS_PER_NODE="$SLURM_NTASKS_PER_NODE(x$SLURM_JOB_NUM_NODES)"
    fi
    : "${SLURM_NTASKS:=$(( $(wpn_tasks_per_node "$SLURM_TASKS_PER_NODE" | paste -sd+) ))}"
    if [[ -z ${WPN_DIST_HOSTS:-} && -z ${SLURM_JOB_NODELIST:-} ]]; then
        WPN_DIST_HOSTS=$(for ((i = 1; i <= SLURM_JOB_NUM_NODES; i++)); do printf 'node%03d ' "$i"; done)
    fi
elif [[ -z ${SLURM_JOB_ID:-} ]]; then
    wpn_die "not inside a Slurm job: submit with \`sbatch $0\`, or preview with WPN_DIST_DRY_RUN=1 bash $0"
fi

# --- hosts, rendezvous ---------------------------------------------------------------------------------
if [[ -n ${WPN_DIST_HOSTS:-} ]]; then
    HOSTS=$(tr -s ', ' '\n' <<<"$WPN_DIST_HOSTS" | sed '/^$/d')
elif [[ $DRY_RUN == 1 ]]; then
    HOSTS=$(wpn_expand_hostlist "$SLURM_JOB_NODELIST")
else
    HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
fi
mapfile -t HOST_ARRAY <<<"$HOSTS"
MASTER_ADDR=${WPN_DIST_MASTER_ADDR:-${HOST_ARRAY[0]}}
MASTER_PORT=${WPN_DIST_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
# The ranks must take RANK/LOCAL_RANK/WORLD_SIZE from srun's SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS,
# never from a value leaked from the submitting shell.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE

# A dead or stuck rank must end the job, not hang it: NCCL aborts a failed/timed-out collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}  # its name before torch 2.2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
# The time a rank has to save after a stop signal (wpn_dist/app/trainer.py, StopSignal.seconds_left): this
# script's --signal=USR1@T margin, and Slurm's KillWait between SIGTERM and SIGKILL. A save that cannot
# finish in it is not started: the job requeues from the last periodic checkpoint instead.
if [[ -z ${WPN_DIST_SIGNAL_MARGIN_S:-} ]]; then
    signal_option=$(wpn_sbatch_option "$WPN_TEMPLATE" signal)
    [[ $signal_option =~ @([0-9]+)$ ]] && WPN_DIST_SIGNAL_MARGIN_S=${BASH_REMATCH[1]}
fi
if [[ -z ${WPN_DIST_KILL_WAIT_S:-} && $DRY_RUN != 1 ]] && command -v scontrol >/dev/null; then
    WPN_DIST_KILL_WAIT_S=$(scontrol show config 2>/dev/null | awk '$1 == "KillWait" {print $3}')
fi
export WPN_DIST_SIGNAL_MARGIN_S=${WPN_DIST_SIGNAL_MARGIN_S:-} WPN_DIST_KILL_WAIT_S=${WPN_DIST_KILL_WAIT_S:-30}

# --- the trainer's command line ------------------------------------------------------------------------
: "${MODEL:?the template must set MODEL}"
: "${MODEL_INIT:=pretrained}"
: "${DATA:=PKU-Alignment/PKU-SafeRLHF}"
if [[ -z ${DATA_FORMAT:-} ]]; then
    # A hub dataset name ("org/name", no such path, no file extension) is read as PKU-SafeRLHF.
    if [[ ! -e $DATA && $DATA =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ && ! $DATA =~ \.(jsonl?|parquet|csv)$ ]]; then
        DATA_FORMAT=pku
    else
        DATA_FORMAT=auto
    fi
fi
: "${DS_CONFIG:=zero3}"
: "${PRECISION:=bf16}"
: "${MICRO_BATCH_SIZE:=4}"
: "${GRAD_ACCUM:=1}"
: "${ACTIVATION_CHECKPOINTING:=true}"
: "${SAVE_EVERY:=50}"
: "${OUTPUT_ROOT:=runs}"
: "${OUTPUT_DIR:=$OUTPUT_ROOT/$SLURM_JOB_NAME-$SLURM_JOB_ID}"
: "${PYTHON:=python3}"
read -r -a EXTRA <<<"${TEMPLATE_ARGS:-} ${EXTRA_ARGS:-}"  # the template's extra defaults, then yours
read -r -a SRUN_EXTRA <<<"${SRUN_ARGS:-}"

TRAIN=("$PYTHON" wpn_dist/train.py --model "$MODEL" --model_init "$MODEL_INIT" --data "$DATA"
    --data_format "$DATA_FORMAT" --ds_config "$DS_CONFIG" --precision "$PRECISION"
    --micro_batch_size "$MICRO_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
    --activation_checkpointing "$ACTIVATION_CHECKPOINTING" --save_every "$SAVE_EVERY")
[[ -n ${STEPS:-} ]] && TRAIN+=(--steps "$STEPS")
[[ -n ${LR:-} ]] && TRAIN+=(--lr "$LR")
# A requeued job keeps its id, hence its run directory: --resume auto continues it.
TRAIN+=(--output_dir "$OUTPUT_DIR" --resume auto "${EXTRA[@]}")

# Not --kill-on-bad-exit=1: on a stop signal every rank exits 99 after the checkpoint, and the first one to
# exit would make srun kill the others (srun then reports 143, not 99: the job would not be requeued).
# --wait=N instead: once any rank has ended, srun ends the others after N seconds, so a dead rank (or a
# failure on some ranks only) ends the job instead of hanging it.
: "${SRUN_WAIT:=30}"
SRUN=(srun --kill-on-bad-exit=0 --wait="$SRUN_WAIT" --distribution=block --ntasks="$SLURM_NTASKS")
[[ -n ${SLURM_NTASKS_PER_NODE:-} ]] && SRUN+=(--ntasks-per-node="$SLURM_NTASKS_PER_NODE")
# Slurm 22.05-23.02 srun does not inherit the job's --cpus-per-task: pass it on.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
SRUN+=("${SRUN_EXTRA[@]}")

quoted() { printf '%q ' "$@" | sed 's/ $//'; }

if [[ $DRY_RUN == 1 ]]; then
    echo "# dry run of job $SLURM_JOB_NAME (id $SLURM_JOB_ID): ${#HOST_ARRAY[@]} node(s), $SLURM_NTASKS rank(s), tasks per node $SLURM_TASKS_PER_NODE"
    echo "# batch script (on ${HOST_ARRAY[0]}), in $WPN_DIST_ROOT:"
    echo "srun: $(quoted "${SRUN[@]}" "${TRAIN[@]}")"
    echo "# each task: wpn_dist.app.distributed.init() sets RANK=SLURM_PROCID LOCAL_RANK=SLURM_LOCALID WORLD_SIZE=SLURM_NTASKS"
    echo "# stop deadlines: WPN_DIST_SIGNAL_MARGIN_S=$WPN_DIST_SIGNAL_MARGIN_S WPN_DIST_KILL_WAIT_S=$WPN_DIST_KILL_WAIT_S"
    rank=0 node=0
    while read -r count; do
        for ((local = 0; local < count; local++)); do
            echo "rank: host=${HOST_ARRAY[node]} RANK=$rank LOCAL_RANK=$local WORLD_SIZE=$SLURM_NTASKS" \
                "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT $(quoted "${TRAIN[@]}")"
            rank=$((rank + 1))
        done
        node=$((node + 1))
    done < <(wpn_tasks_per_node "$SLURM_TASKS_PER_NODE")
    [[ $rank -eq $SLURM_NTASKS ]] || wpn_die "SLURM_TASKS_PER_NODE=$SLURM_TASKS_PER_NODE gives $rank ranks, SLURM_NTASKS=$SLURM_NTASKS"
    [[ $node -le ${#HOST_ARRAY[@]} ]] || wpn_die "$node nodes needed, ${#HOST_ARRAY[@]} host(s) given"
    exit 0
fi

# --- run -------------------------------------------------------------------------------------------------
wpn_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME), restart ${SLURM_RESTART_COUNT:-0}, nodes $(paste -sd, <<<"$HOSTS"), $SLURM_NTASKS ranks; rendezvous $MASTER_ADDR:$MASTER_PORT; run directory $OUTPUT_DIR"
wpn_log "$(quoted "${SRUN[@]}" "${TRAIN[@]}")"

# srun runs in the background so that this shell survives a SIGTERM (preemption, scancel, time limit) and
# can requeue the job once the ranks have saved their checkpoint. Slurm signals the ranks itself: the job
# steps get `--signal=USR1@T` (no "B:") and `scancel --signal=USR1` directly, and SIGTERM on preemption.
# A USR1 sent to this shell only (`--signal=B:USR1@T`, `scancel --batch --signal=USR1`) is passed on to
# srun, which passes it to every rank.
set +e
"${SRUN[@]}" "${TRAIN[@]}" &
srun_pid=$!
trap 'wpn_log "batch script got SIGTERM; waiting for the ranks to save and stop"' TERM
trap 'wpn_log "batch script got SIGUSR1; passing it to the ranks"; kill -USR1 "$srun_pid" 2>/dev/null' USR1
while :; do
    wait "$srun_pid"
    status=$?
    kill -0 "$srun_pid" 2>/dev/null || break  # else wait was interrupted by a trapped signal
done
set -e

if [[ $status -eq $STOPPED_EXIT_CODE ]]; then
    if [[ ${WPN_DIST_REQUEUE:-1} == 1 ]]; then
        wpn_log "the ranks stopped on a signal after saving a checkpoint; requeueing job $SLURM_JOB_ID (it resumes from $OUTPUT_DIR)"
        # Slurm stops this script here and puts the job back in the queue (same id, same run directory).
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        wpn_log "scontrol requeue failed (is the job --requeue-able?); resubmit with OUTPUT_DIR=$OUTPUT_DIR to continue"
    fi
    exit "$STOPPED_EXIT_CODE"
fi
if [[ $status -ne 0 ]]; then
    wpn_log "srun exited with status $status; the newest complete checkpoint in $OUTPUT_DIR is kept (resubmit with OUTPUT_DIR=$OUTPUT_DIR to continue)"
fi
exit "$status"
