"""The few collectives the library issues itself, and where this process stands in the group.

Every function here is safe without a process group (one process: the identity), and every
collective must be reached by every rank in the same order: callers keep that contract. Setting up
and leaving the group is the application's (wpn_dist.app.distributed).
"""
import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cpu") if on_cpu() else torch.device("cuda", torch.cuda.current_device())


def _all_reduce(value: float, op) -> float:
    if not is_initialized() or world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_max(value: int) -> int:
    """The largest int ``value`` over all ranks (collective)."""
    return int(_all_reduce(value, dist.ReduceOp.MAX))


def all_reduce_max_float(value: float) -> float:
    """The largest float ``value`` over all ranks (collective)."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def all_reduce_sum(value: float) -> float:
    """The sum of ``value`` over all ranks (collective)."""
    return _all_reduce(value, dist.ReduceOp.SUM)


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


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) along dim 0, without autograd (collective)."""
    if not is_initialized() or world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
