"""Joining and leaving the process group, and how a rank reports and exits.

Ranks come from the environment that the launcher sets: ``deepspeed``/``torchrun`` (RANK,
LOCAL_RANK, WORLD_SIZE) or Slurm's ``srun`` (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS). The
collectives themselves are the library's (wpn_dist.core.collectives), re-exported here so that the
application has one module to ask about ranks.
"""
import os
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
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))


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
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl",
                               timeout=timedelta(minutes=timeout_minutes))
    if not on_cpu():
        torch.cuda.set_device(env_local_rank())


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
