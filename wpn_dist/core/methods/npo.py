"""NPO (Zhang, Lin, Bai, Mei 2024, "Negative Preference Optimization"): the harmful responses are
dispreferred against the frozen original model, with a retain term (NPO+RT):
``npo_weight * mean_y -(2/beta) log sigmoid(-beta (log p(y|x) - log p_ref(y|x))) + npo_retain_weight * CE(normal)``.
The forget set is every harmful response ``[prompt; harmful]``; the retain term is the normal data's
response cross-entropy. Defaults (beta 0.1, both weights 1) are open-unlearning's configuration of
NPO as we read it; log p is summed over the response tokens, as in the paper."""
from dataclasses import dataclass, field

import torch.nn.functional as F

from . import register
from .base import (Method, cross_entropy, forward, harmful_rows, reference_sequence_nll, row_mean, sequence_nll,
                   total)


@dataclass
class NPOOptions:
    npo_beta: float = field(default=0.1, metadata={"help": "NPO: inverse temperature beta."})
    npo_weight: float = field(default=1.0, metadata={"help": "NPO: weight of the NPO term on the harmful responses."})
    npo_retain_weight: float = field(default=1.0, metadata={
        "help": "NPO: weight of the cross-entropy of normal responses (--normal_data; 0: plain NPO)."})

    def __post_init__(self):
        if self.npo_beta <= 0:
            raise ValueError(f"--npo_beta must be > 0, got {self.npo_beta}")
        for name in ("npo_weight", "npo_retain_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")


@register
class NPO(Method):
    name = "npo"
    Options = NPOOptions

    def row_groups(self) -> tuple:
        return ("normal",) if self.options.npo_retain_weight > 0 else ()

    def needs_reference(self) -> bool:
        return True

    def batch_options(self) -> dict:
        return {"positive_responses": False}  # the harmless responses are never read

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        o = self.options
        layout = batch["layout"]
        harmful = harmful_rows(batch)
        tokens = {"harmful": layout.targets(harmful)}
        if o.npo_retain_weight > 0:
            tokens["normal"] = layout.targets(batch["normal_rows"])
        out = forward(model, batch, logits_for=tokens.values())
        # log p - log p_ref = NLL_ref - NLL, per harmful response
        log_ratio = reference_sequence_nll(reference, batch, harmful) - sequence_nll(out, harmful, tokens["harmful"])
        per_row = -(2.0 / o.npo_beta) * F.logsigmoid(-o.npo_beta * log_ratio)
        terms = {"loss/npo": row_mean(per_row, batch, harmful, "rows/negative")}
        weights = {"npo": o.npo_weight}
        if o.npo_retain_weight > 0:
            terms["loss/retain"] = cross_entropy(out, batch, batch["normal_rows"], tokens["normal"], "tokens/normal")
            weights["retain"] = o.npo_retain_weight
        return total(terms, weights)
