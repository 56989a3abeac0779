"""Token-level terms of the objectives: response cross-entropy and KL to a frozen reference.

Each term is a weighted sum divided by a normalizer. Alone (no weights, no normalizer) it is the
plain mean over the tokens it covers. In the trainer the weights are 0 for a sampler's padding copy
of an example already counted in the optimizer step, and the normalizer is the step's global count
divided by (ranks x accumulation steps): the engine then averages those local values into exactly
the mean over the whole global batch, whatever the world size and accumulation (see
wpn_dist.app.data.StepPlan).
"""
import torch
import torch.nn.functional as F


def _row_weights(rows: int, row_weights, device) -> torch.Tensor:
    if row_weights is None:
        return torch.ones(rows, device=device)
    return row_weights.to(device=device, dtype=torch.float32)


def response_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor | None = None,
                           normalizer: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy of the labelled tokens (labels != -100) of ``logits[R, T, V]``:
    sum over rows of ``row_weights[r]`` x the row's token losses, divided by ``normalizer`` (default:
    the number of weighted labelled tokens, i.e. the mean)."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    per_token = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                reduction="none").view(targets.shape)
    weights = _row_weights(targets.shape[0], row_weights, per_token.device)[:, None] * (targets != -100)
    total = (per_token * weights).sum()
    if normalizer is None:
        return total / weights.sum().clamp_min(1.0)
    return total / normalizer


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor, attention: torch.Tensor,
                    row_weights: torch.Tensor | None = None, normalizer: float | None = None) -> torch.Tensor:
    """KL(p_reference || p_model) of the next-token distributions, summed over attended positions
    (weighted by row) and divided by ``normalizer`` (default: the weighted number of positions)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(reference_logits.float(), dim=-1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    weights = _row_weights(per_token.shape[0], row_weights, per_token.device)[:, None] * attention.to(per_token.dtype)
    total = (per_token * weights).sum()
    if normalizer is None:
        return total / weights.sum().clamp_min(1.0)
    return total / normalizer
