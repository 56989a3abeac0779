"""Pooling of per-token hidden states into one vector per sequence span.

Pure tensor functions: no model, no distributed state. ``mask`` selects the span to pool (1 inside
the span, 0 elsewhere, padding included in "elsewhere").
"""
import torch

POOLING_MODES = ("weighted", "mean", "last")


def position_weights(mask: torch.Tensor) -> torch.Tensor:
    """Weights ``w_t = t / sum_u u`` for the t-th position inside each row's span (t = 1..n).

    Later tokens weigh more: in a causal model they have attended to more of the span (SGPT's
    position-weighted mean pooling). Rows with an empty span get all-zero weights.
    """
    mask = mask.to(torch.float32)
    rank_in_span = torch.cumsum(mask, dim=1) * mask  # 1..n inside the span, 0 outside
    total = rank_in_span.sum(dim=1, keepdim=True).clamp_min(1.0)
    return rank_in_span / total


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "weighted") -> torch.Tensor:
    """Pool ``hidden[B, T, D]`` over the positions where ``mask[B, T]`` is 1 into ``[B, D]``.

    ``weighted``: position-weighted mean; ``mean``: plain mean; ``last``: the span's last position.
    The result is fp32 whatever the dtype of ``hidden``, so that the loss is computed in fp32.
    """
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"pool expects hidden [B,T,D] and mask [B,T], got {tuple(hidden.shape)} "
                         f"and {tuple(mask.shape)}")
    hidden = hidden.to(torch.float32)
    mask = mask.to(torch.float32)
    if mode == "weighted":
        weights = position_weights(mask)
    elif mode == "mean":
        weights = mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    elif mode == "last":
        # One-hot on the last position of the span: the position whose running count reaches
        # the span length.
        counts = torch.cumsum(mask, dim=1)
        weights = (counts == mask.sum(dim=1, keepdim=True)).to(torch.float32) * mask
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {POOLING_MODES}")
    return torch.einsum("bt,btd->bd", weights, hidden)
