"""Process-group set-up and the few collectives wpn_dist issues itself.

Ranks come from the environment that the launcher sets: ``deepspeed``/``torchrun`` (RANK,
LOCAL_RANK, WORLD_SIZE) or Slurm's ``srun`` (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS). Every
collective here must be reached by every rank in the same order: callers keep that contract.
"""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from .launch import free_port


def env_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else env_rank()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available()


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


def device() -> torch.device:
    return torch.device("cpu") if on_cpu() else torch.device("cuda", env_local_rank())


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over all ranks (collective)."""
    if not is_initialized() or world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(value: float) -> float:
    """The sum of ``value`` over all ranks (collective)."""
    if not is_initialized() or world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_mean(value: float) -> float:
    """The mean of ``value`` over all ranks (collective)."""
    return all_reduce_sum(value) / world_size()


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (collective)."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, group=None):
    """Rank 0's ``obj`` on every rank (collective; over ``group`` if given, else every rank's group)."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the gradient of its own slice,
    summed over every rank's loss (an all-reduce then a slice; gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) from all ranks along dim 0 (collective).

    Gradients flow back to the rank that produced each slice. The local slice of the result is the
    caller's own tensor in value; its gradient arrives through the all-reduce in backward, which
    also carries what the other ranks' losses contribute to it.
    """
    if not is_initialized() or world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) along dim 0, without autograd (collective)."""
    if not is_initialized() or world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def fail(message: str, code: int = 2) -> None:
    """Print one error line and leave (used for user errors found before training starts)."""
    if env_rank() == 0:  # every rank finds the same error: say it once
        print(f"wpn_dist: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
