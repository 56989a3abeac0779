# shellcheck shell=bash
# Shared logic of the slurm/*.sh job templates; they source this file after their #SBATCH lines and
# model defaults. One Slurm task per GPU: `srun` starts `python wpn_dist/train.py` once per rank (no
# deepspeed launcher inside the job); wpn_dist.app.distributed.init() reads the rank from SLURM_PROCID,
# SLURM_LOCALID and SLURM_NTASKS. See slurm/README.md.
#
# Knobs (environment variables; sbatch passes the submitting shell's environment to the job; the
# templates' defaults are in parentheses):
#   CONFIG (a trainer config file, --config; its values beat the templates' defaults, knobs set in the
#   environment beat it), MODEL, MODEL_INIT (pretrained), DATA (required: a file, or a hub id such as
#   DATA=PKU-Alignment/PKU-SafeRLHF; not needed when CONFIG gives data:), DATA_FORMAT (pku for a hub id
#   "org/name", else auto), DS_CONFIG (zero3), PRECISION (bf16), MICRO_BATCH_SIZE, GRAD_ACCUM (1),
#   ACTIVATION_CHECKPOINTING (true), STEPS, LR (the trainer's defaults), SAVE_EVERY (50), LOG_EVERY,
#   EXPORT_HF (the trainer's), OUTPUT_ROOT ($SCRATCH/wpn_dist; required when SCRATCH is unset),
#   OUTPUT_DIR ($OUTPUT_ROOT/$SLURM_JOB_NAME-$SLURM_JOB_ID), EXTRA_ARGS (more trainer options, split with
#   shell quoting: EXTRA_ARGS='--prompt_format "Q: {prompt} A:"'), then the batch script's own arguments
#   (`sbatch slurm/x.sh --opt value`; they come last, so they override everything), PYTHON (python3),
#   HF_HOME (passed through: the cache `python -m wpn_dist.prepare` filled), WPN_DIST_OFFLINE (1: the
#   default of HF_HUB_OFFLINE and HF_DATASETS_OFFLINE; 0: compute nodes may download),
#   TORCH_EXTENSIONS_DIR ($HF_HOME/torch_extensions when HF_HOME is set), OMP_NUM_THREADS
#   (--cpus-per-task, else 1), SRUN_ARGS (more srun options, shell quoting), SRUN_WAIT (30: seconds the
#   other ranks may run on after one has ended), WPN_DIST_MASTER_ADDR / WPN_DIST_MASTER_PORT (override the
#   rendezvous), WPN_DIST_REQUEUE (1: requeue on a stop signal; 0: exit 99 instead),
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

# Split $2 into words with shell quoting rules into the array named $1
# ('--prompt_format "Q: {prompt} A:"' -> 2 words). xargs does the quoting (quotes and backslashes only: no
# expansion, nothing is run, unlike eval). Returns 1 on unbalanced quotes.
wpn_split_words() {
    local -n words_=$1
    words_=()
    [[ -n ${2//[[:space:]]/} ]] || return 0
    xargs printf '%s\0' <<<"$2" >/dev/null 2>&1 || return 1
    mapfile -d '' words_ < <(xargs printf '%s\0' <<<"$2")
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
# Compute nodes are often offline: by default the job reads models and datasets only from the cache that
# `python -m wpn_dist.prepare --cache_dir DIR` filled on the login node (HF_HOME=DIR, passed through from the
# submitting shell), and a missing file is an error instead of a hang. WPN_DIST_OFFLINE=0 (or the two
# variables set to 0) lets nodes with internet download (once per node, by local rank 0).
: "${WPN_DIST_OFFLINE:=1}"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-$WPN_DIST_OFFLINE} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-$WPN_DIST_OFFLINE}
# DeepSpeed's JIT-built ops: the prepare step prebuilds them in ${TORCH_EXTENSIONS_DIR:-$HF_HOME/torch_extensions}
# (the same expression here), so that the ranks do not compile them on every node.
if [[ -n ${HF_HOME:-} && -z ${TORCH_EXTENSIONS_DIR:-} ]]; then
    export TORCH_EXTENSIONS_DIR=$HF_HOME/torch_extensions
fi
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
# Where each option comes from, weakest first: the trainer's default < the template's default (its
# `: "${X:=...}"` lines and the ones below) < the CONFIG file < a knob set in the environment < EXTRA_ARGS
# < the batch script's arguments. A template default is left out when the CONFIG file sets that option, so
# the file is never overridden by a value the user did not choose; a knob is the user's when it is exported
# (sbatch's environment, `VAR=value sbatch ...`), a template default when only this shell set it.
: "${MODEL:?the template must set MODEL}"
: "${PYTHON:=python3}"
CONFIG_KEYS=() CONFIG_DATA="" CONFIG_KEEPS=()
if [[ -n ${CONFIG:-} ]]; then
    [[ -f $CONFIG ]] || wpn_die "CONFIG=$CONFIG: no such file (relative paths are relative to $WPN_DIST_ROOT)"
    # Its option names (a-b read as a_b) and its data:, read as the trainer reads the file
    # (wpn_dist/app/options.py: YAML for .yaml/.yml, else JSON).
    config_text=$("$PYTHON" - "$CONFIG" <<'PY'
import json, sys
path = sys.argv[1]
try:
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml
            values = yaml.safe_load(f) or {}
        else:
            values = json.load(f)
    assert isinstance(values, dict), "must hold a mapping of option: value"
except Exception as e:  # one line, on stdout: the batch script's error message
    print(f"cannot read it ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    sys.exit(1)
print(" ".join(str(k).replace("-", "_") for k in values))
print("" if values.get("data") is None else values["data"])
PY
    ) || wpn_die "CONFIG=$CONFIG: $config_text"
    read -r -a CONFIG_KEYS <<<"$(sed -n 1p <<<"$config_text")"
    CONFIG_DATA=$(sed -n 2p <<<"$config_text")
fi
# A knob is the user's when exported (sbatch's environment), a template default when only this shell set it.
wpn_from_env() { [[ ${!1@a} == *x* ]]; }
wpn_in_config() { [[ " ${CONFIG_KEYS[*]} " == *" $1 "* ]]; }
# Append `--OPTION "$KNOB"` to TRAIN when KNOB has a value, except a template default for an option that the
# CONFIG file sets (the third argument, "user", counts the value as the user's).
wpn_opt() {
    local knob=$1 option=$2 user=${3:-}
    [[ -n ${!knob:-} ]] || return 0
    if [[ $user != user ]] && ! wpn_from_env "$knob" && wpn_in_config "$option"; then
        CONFIG_KEEPS+=("$option")
        return 0
    fi
    TRAIN+=("--$option" "${!knob}")
}

if [[ -z ${DATA:-} && -z $CONFIG_DATA ]]; then
    wpn_die "DATA is not set: give your rows (DATA=/shared/data/rows.jsonl) or the hub dataset explicitly (DATA=PKU-Alignment/PKU-SafeRLHF), or data: in the CONFIG file"
fi
data_is_users=""
[[ -n ${DATA:-} ]] && wpn_from_env DATA && data_is_users=user
# What the trainer will read: the user's DATA, else the file's data:, else the template's DATA.
data=${DATA:-}
[[ -z $data_is_users && -n $CONFIG_DATA ]] && data=$CONFIG_DATA
if [[ -z ${DATA_FORMAT:-} ]]; then
    # A hub dataset name ("org/name", no such path, no file extension) is read as PKU-SafeRLHF. This guess
    # goes with DATA: the user's when DATA is.
    if [[ ! -e $data && $data =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ && ! $data =~ \.(jsonl?|parquet|csv)$ ]]; then
        DATA_FORMAT=pku
    else
        DATA_FORMAT=auto
    fi
    data_format_is_users=$data_is_users
else
    data_format_is_users=""
fi
: "${MODEL_INIT:=pretrained}"
: "${DS_CONFIG:=zero3}"
: "${PRECISION:=bf16}"
: "${MICRO_BATCH_SIZE:=4}"
: "${GRAD_ACCUM:=1}"
: "${ACTIVATION_CHECKPOINTING:=true}"
: "${SAVE_EVERY:=50}"
# Runs go to a file system every node sees, and not into the checkout unless asked for.
: "${OUTPUT_ROOT:=${SCRATCH:+$SCRATCH/wpn_dist}}"
if [[ -z ${OUTPUT_DIR:-} ]]; then
    [[ -n $OUTPUT_ROOT ]] ||
        wpn_die "OUTPUT_ROOT is not set (nor SCRATCH): set OUTPUT_ROOT to a directory every node sees, or OUTPUT_ROOT=\$PWD/runs to keep the runs in the checkout"
    OUTPUT_DIR=$OUTPUT_ROOT/$SLURM_JOB_NAME-$SLURM_JOB_ID
fi

# EXTRA_ARGS and SRUN_ARGS are split with shell quoting, so a value may hold spaces
# (EXTRA_ARGS='--prompt_format "Q: {prompt} A:"'); nothing in them is expanded or run.
wpn_split_words EXTRA "${EXTRA_ARGS:-}" || wpn_die "EXTRA_ARGS: unbalanced quotes in: ${EXTRA_ARGS}"
wpn_split_words SRUN_EXTRA "${SRUN_ARGS:-}" || wpn_die "SRUN_ARGS: unbalanced quotes in: ${SRUN_ARGS}"
# The file must come through CONFIG: given as --config, the template would not know to leave its values alone.
for word in "${EXTRA[@]}" "$@"; do
    [[ $word == --config || $word == --config=* ]] &&
        wpn_die "give the trainer config file as CONFIG=FILE, not --config in EXTRA_ARGS or the script's arguments"
done

TRAIN=("$PYTHON" wpn_dist/train.py)
[[ -n ${CONFIG:-} ]] && TRAIN+=(--config "$CONFIG")
wpn_opt MODEL model
wpn_opt MODEL_INIT model_init
wpn_opt DATA data "$data_is_users"
wpn_opt DATA_FORMAT data_format "$data_format_is_users"
wpn_opt DS_CONFIG ds_config
wpn_opt PRECISION precision
wpn_opt MICRO_BATCH_SIZE micro_batch_size
wpn_opt GRAD_ACCUM gradient_accumulation_steps
wpn_opt ACTIVATION_CHECKPOINTING activation_checkpointing
wpn_opt STEPS steps
wpn_opt LR lr
wpn_opt SAVE_EVERY save_every
wpn_opt LOG_EVERY log_every
wpn_opt EXPORT_HF export_hf
# A requeued job keeps its id, hence its run directory: --resume auto continues it. These two are always
# the template's (a file's output_dir/resume would break the requeue); EXTRA_ARGS, then the script's own
# arguments (`sbatch slurm/x.sh --opt value`) come last and override everything.
for option in output_dir resume; do
    wpn_in_config "$option" && wpn_log "CONFIG=$CONFIG sets $option: replaced by the template's --output_dir $OUTPUT_DIR --resume auto"
done
TRAIN+=(--output_dir "$OUTPUT_DIR" --resume auto "${EXTRA[@]}" "$@")

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
# The environment that decides where the ranks read from and how many threads they use.
ENV_SHOWN=(OMP_NUM_THREADS HF_HOME HF_HUB_OFFLINE HF_DATASETS_OFFLINE TORCH_EXTENSIONS_DIR)
env_line=$(for name in "${ENV_SHOWN[@]}"; do printf '%s=%q ' "$name" "${!name:-}"; done | sed 's/ $//')
config_line=""
[[ -n ${CONFIG:-} ]] && config_line="CONFIG=$CONFIG sets ${CONFIG_KEYS[*]:-nothing}; the template's defaults left to it: ${CONFIG_KEEPS[*]:-none}"

if [[ $DRY_RUN == 1 ]]; then
    echo "# dry run of job $SLURM_JOB_NAME (id $SLURM_JOB_ID): ${#HOST_ARRAY[@]} node(s), $SLURM_NTASKS rank(s), tasks per node $SLURM_TASKS_PER_NODE"
    echo "# batch script (on ${HOST_ARRAY[0]}), in $WPN_DIST_ROOT:"
    echo "srun: $(quoted "${SRUN[@]}" "${TRAIN[@]}")"
    echo "# each task: wpn_dist.app.distributed.init() sets RANK=SLURM_PROCID LOCAL_RANK=SLURM_LOCALID WORLD_SIZE=SLURM_NTASKS"
    echo "# stop deadlines: WPN_DIST_SIGNAL_MARGIN_S=$WPN_DIST_SIGNAL_MARGIN_S WPN_DIST_KILL_WAIT_S=$WPN_DIST_KILL_WAIT_S"
    echo "# env: $env_line"
    [[ -z $config_line ]] || echo "# config: $config_line"
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
wpn_log "env: $env_line"
[[ -z $config_line ]] || wpn_log "$config_line"
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
