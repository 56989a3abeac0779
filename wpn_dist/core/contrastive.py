"""The N-pair contrastive loss of WPN, with negatives optionally gathered from every rank.

For anchor i with positive p_i and negative set N_i:

    L_i = -log( exp(s(a_i,p_i)/tau) / (exp(s(a_i,p_i)/tau) + sum_{n in N_i} exp(s(a_i,n)/tau)) )

Local mode: N_i = the example's own (unmasked) negatives. Global mode: N_i = every valid negative of
every example in the global batch, on every rank, with duplicated examples counted once. Positives of
other examples are never negatives.
"""
import torch
import torch.nn.functional as F

import torch.distributed as dist

from . import collectives as distributed

SIMILARITIES = ("cosine", "dot")


def _similarity_inputs(x: torch.Tensor, similarity: str) -> torch.Tensor:
    if similarity == "cosine":
        return F.normalize(x.to(torch.float32), dim=-1)
    if similarity == "dot":
        return x.to(torch.float32)
    raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}")


def _first_occurrence(keys: torch.Tensor) -> torch.Tensor:
    """Bool mask over rows of ``keys[N, C]``: True where a row's key has not appeared before."""
    if keys.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=keys.device)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    positions = torch.arange(keys.shape[0], device=keys.device)
    first = torch.full((int(inverse.max()) + 1,), keys.shape[0], dtype=torch.long, device=keys.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return first[inverse] == positions


def _pad_rows(x: torch.Tensor, rows: int, value=0) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0],) + tuple(x.shape[1:]), value)
    return torch.cat([x, pad], dim=0)


def npair_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
               negatives_mask: torch.Tensor | None = None, temperature: float = 0.1,
               similarity: str = "cosine", global_negatives: bool = False,
               example_ids: torch.Tensor | None = None, anchor_weights: torch.Tensor | None = None,
               normalizer: float | None = None, gather_shape: tuple | None = None) -> torch.Tensor:
    """N-pair loss of ``anchor[B,D]`` against ``positive[B,D]`` and ``negatives[B,K,D]``.

    ``negatives_mask[B,K]`` (1 = real) masks padded negatives. ``example_ids[B]`` marks rows that
    are copies of the same example (samplers pad by repetition): only the first copy in the global
    batch counts, as an anchor and as a source of negatives.

    With ``global_negatives`` and a process group of several ranks this is a collective: every rank
    must call it, in the same order relative to other collectives. B and K may differ between ranks.

    ``anchor_weights[B]`` (optional) replaces the first-copy rule for anchors (the trainer computes it
    over a whole optimizer step); ``normalizer`` (optional) replaces the division by the global anchor
    count over ranks: the result is then ``sum_i w_i L_i / normalizer`` on this rank.

    ``gather_shape`` (optional, with ``anchor_weights`` and ``normalizer``): the step plan already knows
    every rank's shapes and which negatives are first copies; ``negatives_mask`` then holds only those,
    (max B, max K) over the ranks is ``gather_shape``, and the loss issues exactly one collective (the
    gather of the negatives, with their mask as an extra column) and no host synchronisation.

    By default returns a scalar whose mean over ranks is the mean of L_i over all valid anchors of the global
    batch. With one process that is the plain mean. Under data parallelism, where the engine averages
    gradients over ranks, the parameter gradients are therefore those of the single-process loss on
    the whole global batch.
    """
    if anchor.dim() != 2 or positive.shape != anchor.shape:
        raise ValueError(f"anchor and positive must both be [B,D]; got {tuple(anchor.shape)} and "
                         f"{tuple(positive.shape)}")
    if negatives.dim() != 3 or negatives.shape[0] != anchor.shape[0] or negatives.shape[2] != anchor.shape[1]:
        raise ValueError(f"negatives must be [B,K,D] = [{anchor.shape[0]},K,{anchor.shape[1]}]; "
                         f"got {tuple(negatives.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch, num_neg, dim = negatives.shape
    device = anchor.device
    if negatives_mask is None:
        negatives_mask = torch.ones(batch, num_neg, dtype=torch.bool, device=device)
    negatives_mask = negatives_mask.to(device=device, dtype=torch.bool)
    if example_ids is None:
        # Distinct ids per rank and row: no row is a duplicate of another.
        example_ids = torch.arange(batch, device=device) + distributed.rank() * (1 << 40)
    example_ids = example_ids.to(device=device, dtype=torch.long)

    a = _similarity_inputs(anchor, similarity)
    p = _similarity_inputs(positive, similarity)
    n = _similarity_inputs(negatives, similarity)
    multi_rank = distributed.is_initialized() and distributed.world_size() > 1
    if gather_shape is not None:
        if anchor_weights is None or normalizer is None:
            raise ValueError("gather_shape comes with anchor_weights and normalizer (the step plan's)")
        positive_logit = (a * p).sum(-1) / temperature
        if global_negatives:
            pool_emb, pool_mask = _planned_pool(n, negatives_mask, gather_shape, multi_rank)
            negative_logits = (a @ pool_emb.T / temperature).masked_fill(~pool_mask[None, :], float("-inf"))
        else:
            negative_logits = torch.einsum("bd,bkd->bk", a, n) / temperature
            negative_logits = negative_logits.masked_fill(~negatives_mask, float("-inf"))
        per_anchor = torch.logsumexp(torch.cat([positive_logit[:, None], negative_logits], 1), 1) - positive_logit
        return (per_anchor * anchor_weights.to(device=device, dtype=torch.float32)).sum() / normalizer

    if multi_rank:
        # Shapes must agree on every rank before the gathers: pad B and K to the global maximum.
        max_batch = distributed.all_reduce_max(batch)
        all_ids = distributed.all_gather_no_grad(_pad_rows(example_ids, max_batch, -1))
        all_valid_rows = all_ids >= 0
    else:
        max_batch, all_ids = batch, example_ids
        all_valid_rows = torch.ones(batch, dtype=torch.bool, device=device)
    # An anchor counts if it is the first copy of its example in the global batch.
    first_copy = _first_occurrence(all_ids[:, None]) & all_valid_rows
    offset = distributed.rank() * max_batch if multi_rank else 0
    anchor_counts = first_copy[offset:offset + batch].to(torch.float32)
    if anchor_weights is not None:
        anchor_counts = anchor_weights.to(device=device, dtype=torch.float32)

    positive_logit = (a * p).sum(-1) / temperature  # [B]
    if global_negatives:
        if multi_rank:
            max_neg = distributed.all_reduce_max(num_neg)
            if max_neg != num_neg:
                n = torch.cat([n, n.new_zeros(batch, max_neg - num_neg, dim)], dim=1)
                negatives_mask = torch.cat([negatives_mask, negatives_mask.new_zeros(batch, max_neg - num_neg)], 1)
            flat = _pad_rows(n.reshape(batch * max_neg, dim), max_batch * max_neg)
            flat_mask = _pad_rows(negatives_mask.reshape(-1), max_batch * max_neg, False)
            pool_emb = all_gather_with_grad(flat)
            pool_mask = distributed.all_gather_no_grad(flat_mask)
            owner = all_ids.repeat_interleave(max_neg)
            slot = torch.arange(max_neg, device=device).repeat(all_ids.shape[0])
        else:
            pool_emb = n.reshape(batch * num_neg, dim)
            pool_mask = negatives_mask.reshape(-1)
            owner = example_ids.repeat_interleave(num_neg)
            slot = torch.arange(num_neg, device=device).repeat(batch)
        # A duplicated example contributes its negatives once.
        pool_mask = pool_mask & _first_occurrence(torch.stack([owner, slot], dim=1))
        negative_logits = a @ pool_emb.T / temperature  # [B, N_global]
        negative_logits = negative_logits.masked_fill(~pool_mask[None, :], float("-inf"))
    else:
        negative_logits = torch.einsum("bd,bkd->bk", a, n) / temperature
        negative_logits = negative_logits.masked_fill(~negatives_mask, float("-inf"))

    logits = torch.cat([positive_logit[:, None], negative_logits], dim=1)
    per_anchor = torch.logsumexp(logits, dim=1) - positive_logit  # [B]
    # Multiply rather than index so that a rank whose anchors are all masked keeps its graph
    # (under ZeRO-3 every rank must produce gradients for every parameter).
    local_sum = (per_anchor * anchor_counts).sum()
    if normalizer is not None:
        return local_sum / normalizer
    if multi_rank:
        global_count = distributed.all_reduce_sum(float(anchor_counts.sum()))
        return local_sum * distributed.world_size() / max(global_count, 1.0)
    return local_sum / anchor_counts.sum().clamp_min(1.0)


def _planned_pool(n: torch.Tensor, mask: torch.Tensor, gather_shape: tuple, multi_rank: bool) -> tuple:
    """Every rank's negatives [max_B * max_K, D] and their mask, from one gather: each rank pads its
    [B, K, D] to the planned global shape and appends the mask as a last column."""
    batch, num_neg, dim = n.shape
    if not multi_rank:
        return n.reshape(batch * num_neg, dim), mask.reshape(-1)
    max_batch, max_neg = gather_shape
    slots = torch.cat([n, mask[:, :, None].to(n.dtype)], dim=2)  # [B, K, D + 1]
    padded = slots.new_zeros(max_batch, max_neg, dim + 1)
    padded[:batch, :num_neg] = slots
    pool = all_gather_with_grad(padded.reshape(max_batch * max_neg, dim + 1))
    return pool[:, :dim], pool[:, dim] > 0.5


# --- the gather the loss owns ------------------------------------------------------------------

class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the gradient of its own slice, summed
    over every rank's loss: a reduce-scatter (half the bytes of an all-reduce), or on gloo, which has
    none, an all-reduce then a slice."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend() != "gloo":
            mine = grad.new_empty((ctx.rows,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad)
            return mine
        dist.all_reduce(grad)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) from all ranks along dim 0 (collective).

    Gradients flow back to the rank that produced each slice. The local slice of the result is the
    caller's own tensor in value; its gradient arrives through the all-reduce in backward, which
    also carries what the other ranks' losses contribute to it.
    """
    if not distributed.is_initialized() or distributed.world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)
