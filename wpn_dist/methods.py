"""The unlearning objectives: one function per method, each computing its loss terms from ONE forward
pass of the model being unlearned over a packed batch (data.pack_batch), plus, for the terms that
need it, one no-grad forward of the frozen reference model.

- ``wpn``: the N-pair loss over position-weighted pooled hidden states (losses.npair_loss), with
  optional auxiliary terms (positive LM, retain).
- ``ga``: gradient ascent as Yao et al. (2023): ``ga_weight * -CE(harmful) + ga_random_weight *
  CE(random normal answer | harmful prompt) + ga_kl_weight * KL(reference || model) on normal data``.
- ``icu``: Tang et al. (2024): ``-icu_forget_weight * CE(harmful) + icu_analogous_weight *
  CE(harmless) + icu_kl_weight * KL(reference || model) on the harmless (analogous) sample``; the
  per-sample iterative refinement between epochs is in wpn_dist/icu.py.
- ``lm``: a plain causal-LM step over every token of the same packed batch (the speed ceiling of the
  scaling study; it does not unlearn anything).

Every function returns ``{"loss/total": tensor, "loss/<term>": tensor, ...}``; each term is logged.
"""
import torch
import torch.nn.functional as F

from .losses import npair_loss
from .pooling import pool

METHODS = ("wpn", "ga", "icu", "lm")


def extra_row_groups(method) -> tuple:
    """Names of the extra row groups (beyond positives and negatives) a method's batch carries."""
    groups = []
    if method.method == "wpn" and method.anchor == "generation":
        groups.append("anchor")
    if method.method == "ga":
        groups += ["random", "normal"]
    if method.method == "wpn" and (method.retain_weight or 0) > 0:
        groups.append("normal")
    return tuple(groups)


def needs_reference(method) -> bool:
    """Whether the method needs the frozen original model (a second engine)."""
    if method.method == "ga":
        return method.ga_kl_weight > 0
    if method.method == "icu":
        return method.icu_kl_weight > 0
    return method.method == "wpn" and (method.retain_weight or 0) > 0 and method.retain_loss == "kl"


def response_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens (labels != -100) of the given rows."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100)


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Mean over attended positions of KL(p_reference || p_model) of the next-token distributions."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(reference_logits.float(), dim=-1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    mask = attention.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


@torch.no_grad()
def reference_logits(reference, batch: dict, rows: torch.Tensor) -> torch.Tensor:
    out = reference(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows])
    return out.logits


def _forward(engine, batch: dict, hidden_states: bool = False, logits: bool = True):
    return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  output_hidden_states=hidden_states, logits_to_keep=0 if logits else 1)


def _total(terms: dict, weights: dict) -> dict:
    terms["loss/total"] = sum(weights[name] * terms[f"loss/{name}"] for name in weights)
    return terms


def wpn_terms(engine, batch: dict, method, reference=None) -> dict:
    """N-pair loss; the anchor is pooled over the prompt tokens of the positive rows (by causality the
    same in every sequence that starts with the prompt: no extra forward), or with ``--anchor
    generation`` over the response tokens of the model's own continuation (extra rows)."""
    lm_weight = method.positive_lm_weight or 0.0
    retain_weight = method.retain_weight or 0.0
    out = _forward(engine, batch, hidden_states=True, logits=lm_weight > 0 or retain_weight > 0)
    hidden = out.hidden_states[-1]
    num_examples = batch["example_ids"].shape[0]
    responses = pool(hidden, batch["response_mask"], method.pooling)  # [S, D] fp32
    if method.anchor == "generation":
        anchor = responses[batch["anchor_rows"]]
    else:
        anchor = pool(hidden[:num_examples], batch["prompt_mask"], method.pooling)
    negatives = responses[batch["negative_rows"]]  # [B, K, D]; masked slots point at row 0
    terms = {"loss/npair": npair_loss(anchor, responses[:num_examples], negatives, batch["negative_mask"],
                                      temperature=method.temperature, similarity=method.similarity,
                                      global_negatives=method.global_negatives, example_ids=batch["example_ids"])}
    weights = {"npair": 1.0}
    if lm_weight > 0:
        terms["loss/positive_lm"] = response_cross_entropy(out.logits[:num_examples], batch["labels"][:num_examples])
        weights["positive_lm"] = lm_weight
    if retain_weight > 0:
        rows = batch["normal_rows"]
        if method.retain_loss == "kl":
            terms["loss/retain"] = kl_to_reference(out.logits[rows], reference_logits(reference, batch, rows),
                                                   batch["attention_mask"][rows])
        else:
            terms["loss/retain"] = response_cross_entropy(out.logits[rows], batch["labels"][rows])
        weights["retain"] = retain_weight
    return _total(terms, weights)


def _harmful_rows(batch: dict) -> torch.Tensor:
    return batch["negative_rows"][batch["negative_mask"]]


def ga_terms(engine, batch: dict, method, reference=None) -> dict:
    out = _forward(engine, batch)
    harmful = _harmful_rows(batch)
    terms = {"loss/ga": -response_cross_entropy(out.logits[harmful], batch["labels"][harmful]),
             "loss/random": response_cross_entropy(out.logits[batch["random_rows"]], batch["labels"][batch["random_rows"]])}
    weights = {"ga": method.ga_weight, "random": method.ga_random_weight}
    if method.ga_kl_weight > 0:
        rows = batch["normal_rows"]
        terms["loss/kl"] = kl_to_reference(out.logits[rows], reference_logits(reference, batch, rows),
                                           batch["attention_mask"][rows])
        weights["kl"] = method.ga_kl_weight
    return _total(terms, weights)


def icu_terms(engine, batch: dict, method, reference=None) -> dict:
    out = _forward(engine, batch)
    harmful = _harmful_rows(batch)
    analogous = torch.arange(batch["example_ids"].shape[0], device=harmful.device)  # the harmless rows
    terms = {"loss/forget": -response_cross_entropy(out.logits[harmful], batch["labels"][harmful]),
             "loss/analogous": response_cross_entropy(out.logits[analogous], batch["labels"][analogous])}
    weights = {"forget": method.icu_forget_weight, "analogous": method.icu_analogous_weight}
    if method.icu_kl_weight > 0:
        terms["loss/kl"] = kl_to_reference(out.logits[analogous], reference_logits(reference, batch, analogous),
                                           batch["attention_mask"][analogous])
        weights["kl"] = method.icu_kl_weight
    return _total(terms, weights)


def lm_terms(engine, batch: dict, method, reference=None) -> dict:
    out = _forward(engine, batch)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return _total({"loss/lm": response_cross_entropy(out.logits, labels)}, {"lm": 1.0})


TERMS = {"wpn": wpn_terms, "ga": ga_terms, "icu": icu_terms, "lm": lm_terms}


def loss_terms(engine, batch: dict, method, reference=None) -> dict:
    return TERMS[method.method](engine, batch, method, reference)
