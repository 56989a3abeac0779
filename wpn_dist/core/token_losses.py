"""Token-level terms of the objectives: next-token cross-entropy and KL to a frozen reference, over
the logits of just the positions a term needs.

``logits`` [U, V] holds the model's logits at U positions; ``index`` [n] picks, for each of the
term's n tokens, its row in ``logits`` (a position may serve several tokens: a shared prompt's last
token predicts the first token of every response). The work is done in chunks of ``CHUNK`` tokens,
each recomputed in backward (``torch.utils.checkpoint``), so the fp32 copy of the full-vocabulary
logits exists for one chunk at a time, never for the whole batch.

Each term is a weighted sum divided by a normalizer. Alone (no weights, no normalizer) it is the
plain mean over its tokens. In the trainer the weights are 0 for a sampler's padding copy of an
example already counted in the optimizer step, and the normalizer is the step's global count
divided by (ranks x accumulation steps): the engine then averages those local values into exactly
the mean over the whole global batch, whatever the world size and accumulation (see
wpn_dist.app.data.BatchMaker.step_batches).
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK = 2048


def _weights(n: int, weights, device) -> torch.Tensor:
    if weights is None:
        return torch.ones(n, device=device)
    return weights.to(device=device, dtype=torch.float32)


def _chunks(fn, logits: torch.Tensor, index: torch.Tensor, *per_token):
    """``fn(logits, index_chunk, *per_token_chunks)`` for each chunk of ``CHUNK`` tokens, recomputed in
    backward when ``logits`` needs a gradient."""
    for start in range(0, index.shape[0], CHUNK):
        part = [index[start:start + CHUNK]] + [t[start:start + CHUNK] for t in per_token]
        yield checkpoint(fn, logits, *part, use_reentrant=False) if logits.requires_grad else fn(logits, *part)


def _chunked_sum(fn, logits: torch.Tensor, index: torch.Tensor, *per_token) -> torch.Tensor:
    if index.shape[0] == 0:
        return logits[:0].float().sum()  # keeps the graph: every rank produces every gradient
    return sum(_chunks(fn, logits, index, *per_token))


def _ce_each(logits, index, labels):
    return F.cross_entropy(logits[index].float(), labels, reduction="none")


def _ce_sum(logits, index, labels, weights):
    return (_ce_each(logits, index, labels) * weights).sum()


def _kl_sum(logits, index, reference, weights):
    log_p = F.log_softmax(logits[index].float(), dim=-1)
    log_q = F.log_softmax(reference.float(), dim=-1)
    return ((log_q.exp() * (log_q - log_p)).sum(-1) * weights).sum()


def cross_entropy_at(logits: torch.Tensor, index: torch.Tensor, labels: torch.Tensor,
                     weights: torch.Tensor | None = None, normalizer: float | None = None) -> torch.Tensor:
    """Cross-entropy of ``labels[i]`` under ``logits[index[i]]``: ``sum_i weights[i] CE_i / normalizer``
    (default: the weighted count, i.e. the mean)."""
    weights = _weights(index.shape[0], weights, logits.device)
    total = _chunked_sum(_ce_sum, logits, index, labels, weights)
    return total / (weights.sum().clamp_min(1.0) if normalizer is None else normalizer)


def token_nll_at(logits: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[n] the cross-entropy of each ``labels[i]`` under ``logits[index[i]]`` (for per-sequence sums),
    in the same recomputed chunks."""
    if index.shape[0] == 0:
        return logits[:0, 0].float()
    return torch.cat(list(_chunks(_ce_each, logits, index, labels)))


def kl_at(logits: torch.Tensor, index: torch.Tensor, reference: torch.Tensor,
          weights: torch.Tensor | None = None, normalizer: float | None = None) -> torch.Tensor:
    """KL(p_reference || p_model) of the next-token distributions at ``logits[index[i]]`` against
    ``reference[i]`` [n, V]: ``sum_i weights[i] KL_i / normalizer`` (default: the weighted count)."""
    weights = _weights(index.shape[0], weights, logits.device)
    total = _chunked_sum(_kl_sum, logits, index, reference, weights)
    return total / (weights.sum().clamp_min(1.0) if normalizer is None else normalizer)
