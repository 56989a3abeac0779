"""Joining and leaving the process group, and how a rank reports and exits.

Ranks come from the environment that the launcher sets: ``deepspeed``/``torchrun``/``accelerate
launch`` with its DeepSpeed config (RANK, LOCAL_RANK, WORLD_SIZE) or Slurm's ``srun`` (SLURM_PROCID,
SLURM_LOCALID, SLURM_NTASKS). The deepspeed launcher's ``--local_rank`` argument is accepted and
ignored: it always sets LOCAL_RANK too. The collectives themselves are the library's
(wpn_dist.core.collectives), re-exported here so that the application has one module to ask about
ranks.

Before the process group is joined a command calls ``check_launch()`` (a launch whose world size is
not the one the launcher was asked for is an error, never a silent single rank) and
``default_threads()`` (OMP_NUM_THREADS unset: the node's usable CPUs shared among its ranks).
"""
import os
import re
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from ..core.collectives import (all_gather_no_grad, all_reduce_max, all_reduce_max_float, all_reduce_mean,  # noqa: F401
                                all_reduce_sum, broadcast_object, device, gather_objects, is_initialized,
                                on_cpu, rank, world_size)


def free_port() -> int:
    """A free TCP port on this machine (for a one-process group or a local launcher)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def env_local_rank() -> int:
    """The rank on this node (also after init() has made LOCAL_RANK a per-task-bound rank's device, 0)."""
    return int(os.environ.get("WPN_DIST_NODE_LOCAL_RANK", os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))


def _slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """This node's entry of Slurm's SLURM_TASKS_PER_NODE ("2(x3),1": 2 on nodes 0-2, 1 on node 3)."""
    counts = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def launcher_local_world_size(env=None) -> int | None:
    """Ranks on this node as the launcher says: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's
    LOCAL_SIZE, or Slurm's tasks per node (SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE,
    SLURM_NTASKS_PER_NODE); None when none of them is set."""
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if env.get(name, "").isdigit() and int(env[name]) > 0:
            return int(env[name])
    if "SLURM_PROCID" in env:
        node = int(env.get("SLURM_NODEID", "0") or 0) if env.get("SLURM_NODEID", "0").isdigit() else 0
        for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
            if env.get(name):
                count = _slurm_tasks_on_node(env[name], node)
                if count:
                    return count
        if env.get("SLURM_NTASKS_PER_NODE", "").isdigit() and int(env["SLURM_NTASKS_PER_NODE"]) > 0:
            return int(env["SLURM_NTASKS_PER_NODE"])
    return None


def env_local_world_size(env=None) -> int:
    """Ranks on this node: the launcher's count (``launcher_local_world_size``), else the world size
    (one node)."""
    env = os.environ if env is None else env
    return launcher_local_world_size(env) or max(1, int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1))))


# --- the launch --------------------------------------------------------------------------------

MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def parent_command(pid: int | None = None) -> list | None:
    """The command line of this process's parent (Linux /proc), or None where it cannot be read."""
    try:
        with open(f"/proc/{os.getppid() if pid is None else pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return None
    return [w.decode(errors="replace") for w in words if w]


def _accelerate_launch_args(command: list | None) -> list | None:
    """The words after ``accelerate launch`` (also ``accelerate-launch``, ``python -m
    accelerate.commands.launch``) in ``command``; None if it is not that launcher."""
    for i, word in enumerate(command or []):
        name = os.path.basename(word)
        if name == "accelerate" and i + 1 < len(command) and command[i + 1] == "launch":
            return command[i + 2:]
        if name in ("accelerate-launch", "accelerate.commands.launch"):
            return command[i + 1:]
    return None


def accelerate_num_processes(launch_args: list) -> int | None:
    """``--num_processes N`` (``--num-processes``, ``=N``) of accelerate launch's own options (those
    before the script), else the ``num_processes`` of its ``--config_file`` (when readable; -1 and
    absent are None)."""
    config_file, i = None, 0
    while i < len(launch_args):
        word = launch_args[i]
        if not word.startswith("-"):
            break  # the training script: what follows is its options
        name, _, value = word.partition("=")
        name = name.replace("-", "_")
        if not value and i + 1 < len(launch_args) and not launch_args[i + 1].startswith("-") \
                and name in ("__num_processes", "__config_file"):
            value, i = launch_args[i + 1], i + 1
        if name == "__num_processes" and value.isdigit():
            return int(value)
        if name == "__config_file":
            config_file = value
        i += 1
    if config_file:
        try:
            import yaml
            with open(config_file, encoding="utf-8") as f:
                number = (yaml.safe_load(f) or {}).get("num_processes")
            return int(number) if int(number) > 0 else None
        except Exception:
            return None
    return None


def launch_problem(env=None, parent: list | None = None) -> str | None:
    """What is wrong with how this process was launched, from the launcher's environment (and, for
    ``accelerate launch``, the parent's command line): None when the process group will have the
    world size the launcher was asked for.

    - ``accelerate launch`` without a DeepSpeed/multi-GPU config (on a machine without GPUs, or with
      ``--cpu`` / MULTI_CPU and no MPI hostfile) starts ONE process whatever ``--num_processes``
      says; that process would train alone. Seen from the process: accelerate's variables, no
      WORLD_SIZE, and MASTER_ADDR/PORT, which its plain launcher sets only for more than one process.
    - ``accelerate launch`` whose torchrun world (WORLD_SIZE) is not its ``--num_processes``
      (e.g. a count that does not divide over ``--num_machines``).
    - MPI (``mpirun``, deepspeed's openmpi/mvapich launchers) with several processes but no
      RANK/WORLD_SIZE: each would be a world of its own.
    - RANK/LOCAL_RANK outside WORLD_SIZE/LOCAL_WORLD_SIZE.
    """
    env = os.environ if env is None else env
    world = env.get("WORLD_SIZE")
    accelerate_env = any(k.startswith("ACCELERATE_") for k in env)
    if accelerate_env:
        launch_args = _accelerate_launch_args(parent)
        if launch_args is not None or parent is None:
            asked = accelerate_num_processes(launch_args or [])
            if world is None and "RANK" not in env and "SLURM_PROCID" not in env \
                    and ((asked or 0) > 1 or (asked is None and "MASTER_PORT" in env)):
                return (f"accelerate launch was asked for {asked or 'several'} processes but started this one alone "
                        "(its plain launcher, used without GPUs or without a DeepSpeed config): launch with "
                        "accelerate launch --config_file ds_configs/accelerate_zero3.yaml --num_processes N, "
                        "or with deepspeed/torchrun")
            if world is not None and world.isdigit() and asked and asked != int(world):
                return (f"accelerate launch was asked for {asked} processes but the world has {world} "
                        "(--num_processes must be a multiple of --num_machines)")
    if world is None and "RANK" not in env and "SLURM_PROCID" not in env:
        for name in MPI_SIZE_VARIABLES:
            if env.get(name, "").isdigit() and int(env[name]) > 1:
                return (f"started by MPI ({name}={env[name]}) without RANK/WORLD_SIZE: every process would train "
                        "alone; launch with deepspeed (its default launcher), torchrun, accelerate launch or srun")
    for rank_name, size_name in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        rank_value, size_value = env.get(rank_name, ""), env.get(size_name, "")
        if rank_value.isdigit() and size_value.isdigit() and int(rank_value) >= int(size_value):
            return f"{rank_name}={rank_value} is outside {size_name}={size_value}: the launcher's variables disagree"
    return None


def check_launch() -> None:
    """Stop with one line (exit 2) when the launch is wrong (``launch_problem``). Call it first,
    before the process group is joined and before anything is written."""
    problem = launch_problem(os.environ, parent_command())
    if problem:
        fail(problem)


def default_threads(env=None) -> int | None:
    """When OMP_NUM_THREADS is unset, give torch max(1, usable CPUs // ranks on this node)
    intra-op threads (the deepspeed launcher and srun leave it unset, and ranks that each take
    every core are several times slower than one thread each); said once, on rank 0. Under Slurm
    with ``--cpus-per-task`` the task's own CPUs count. Returns the number set, or None when
    OMP_NUM_THREADS is set (then torch follows it, and nothing is changed)."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").strip():
        return None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit() and "SLURM_PROCID" in env:
        ranks, threads = 1, max(1, min(usable, int(env["SLURM_CPUS_PER_TASK"])))
        how = f"SLURM_CPUS_PER_TASK={env['SLURM_CPUS_PER_TASK']}"
    else:
        ranks = env_local_world_size(env)
        threads = max(1, usable // ranks)
        how = f"{usable} usable CPUs / {ranks} rank{'s' if ranks > 1 else ''} on this node"
    torch.set_num_threads(threads)
    if int(env.get("RANK", env.get("SLURM_PROCID", 0)) or 0) == 0:
        print(f"wpn_dist: OMP_NUM_THREADS is unset: {threads} thread{'s' if threads > 1 else ''} per rank "
              f"({how}); set OMP_NUM_THREADS to choose", flush=True)
    return threads


def cuda_device_index(local_rank: int, visible: int, ranks_per_node: int | None = None) -> int:
    """The CUDA device of a rank, from its local rank, the devices it sees and the ranks on its node.
    One visible device (per-task binding: ``srun --gpus-per-task=1``, or CUDA_VISIBLE_DEVICES set per
    rank) is device 0; at least as many visible devices as ranks on the node (every rank sees the
    whole node) is the local rank's device. Anything else raises ValueError (one line)."""
    if visible < 1:
        raise ValueError(f"local rank {local_rank} sees no CUDA device (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); on CPU set DS_ACCELERATOR=cpu")
    if visible == 1:
        return 0
    if local_rank < visible and (ranks_per_node is None or visible >= ranks_per_node):
        return local_rank
    node = f"{ranks_per_node} ranks on this node, and local rank {local_rank}" if ranks_per_node \
        else f"local rank {local_rank}"
    raise ValueError(f"{node} sees {visible} CUDA devices "
                     f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): let every rank "
                     "see all the node's GPUs, or give each rank one (srun --gpus-per-task=1)")


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def init(timeout_minutes: int = 30) -> None:
    """Join the process group (a no-op for a single process started without a launcher).

    On CPU the backend is gloo; DeepSpeed would also JIT-build its shared-memory all-reduce op
    (40-100 s of compiling) that only its inference kernels use, so that build is switched off
    unless WPN_DIST_SHM_COMM=1.
    """
    if on_cpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if os.environ.get("WPN_DIST_SHM_COMM", "0") != "1":
            import deepspeed.ops
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if is_initialized():
        return
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        # srun started one process per rank without a launcher: translate Slurm's variables.
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    if "WORLD_SIZE" not in os.environ:
        # One process started as plain `python`: DeepSpeed still wants a (1-rank) group.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    if not on_cpu():
        # Before joining: a rank that sees one GPU (per-task binding) uses device 0 whatever its local
        # rank. DeepSpeed takes its device from LOCAL_RANK (engine, zero.Init), so LOCAL_RANK becomes
        # the device index there; the node-local rank stays in WPN_DIST_NODE_LOCAL_RANK (env_local_rank).
        try:
            index = cuda_device_index(env_local_rank(), torch.cuda.device_count(), launcher_local_world_size())
        except ValueError as e:  # this rank's own error: every rank that has it says it
            print(f"wpn_dist: error: rank {env_rank()}: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        torch.cuda.set_device(index)
        if index != int(os.environ["LOCAL_RANK"]):
            os.environ["WPN_DIST_NODE_LOCAL_RANK"] = os.environ["LOCAL_RANK"]
            os.environ["LOCAL_RANK"] = str(index)
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl",
                               timeout=timedelta(minutes=timeout_minutes))


def shutdown() -> None:
    """Leave the process group together: exiting with gloo's threads still running can abort the
    process at exit ("terminate called without an active exception")."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_now(code: int = 0) -> None:
    """End a finished process with ``code`` without the interpreter's teardown (after shutdown()).
    Seen on CPU ranks: C++ destructors run at interpreter exit can still abort a process whose work is
    done ("terminate called without an active exception", status -6), and the launcher then reports
    the whole run as failed. Everything the process writes is closed or flushed before this."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def fail(message: str, code: int = 2) -> None:
    """Print one error line and leave (used for user errors found before training starts)."""
    if env_rank() == 0:  # every rank finds the same error: say it once
        print(f"wpn_dist: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
