"""SimNPO (Fan, Liu, Lin, Jia, Zhang, Mei, Liu 2024, "Simplicity Prevails: Rethinking Negative
Preference Optimization for LLM Unlearning"): NPO without a reference model, on the length-normalised
log-likelihood, with a margin ``delta``:
``simnpo_weight * mean_y -(2/beta) log sigmoid(beta (NLL(y|x) / |y| - delta)) + simnpo_retain_weight * CE(normal)``.
Defaults (beta 4.5, delta 0, forget weight 0.125, retain weight 1) are open-unlearning's configuration
of SimNPO as we read it; forget and retain sets as NPO's (wpn_dist.core.methods.npo)."""
from dataclasses import dataclass, field

import torch.nn.functional as F

from . import register
from .base import Method, cross_entropy, forward, harmful_rows, row_mean, sequence_nll, total


@dataclass
class SimNPOOptions:
    simnpo_beta: float = field(default=4.5, metadata={"help": "SimNPO: inverse temperature beta."})
    simnpo_delta: float = field(default=0.0, metadata={"help": "SimNPO: margin delta on the per-token NLL."})
    simnpo_weight: float = field(default=0.125, metadata={"help": "SimNPO: weight of the SimNPO term (gamma)."})
    simnpo_retain_weight: float = field(default=1.0, metadata={
        "help": "SimNPO: weight of the cross-entropy of normal responses (--normal_data; 0: none)."})

    def __post_init__(self):
        if self.simnpo_beta <= 0:
            raise ValueError(f"--simnpo_beta must be > 0, got {self.simnpo_beta}")
        for name in ("simnpo_weight", "simnpo_retain_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")


@register
class SimNPO(Method):
    name = "simnpo"
    Options = SimNPOOptions

    def row_groups(self) -> tuple:
        return ("normal",) if self.options.simnpo_retain_weight > 0 else ()

    def batch_options(self) -> dict:
        return {"positive_responses": False}

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        o = self.options
        layout = batch["layout"]
        harmful = harmful_rows(batch)
        tokens = {"harmful": layout.targets(harmful)}
        if o.simnpo_retain_weight > 0:
            tokens["normal"] = layout.targets(batch["normal_rows"])
        out = forward(model, batch, logits_for=tokens.values())
        nll = sequence_nll(out, harmful, tokens["harmful"])
        per_token_nll = nll / tokens["harmful"].lengths.to(nll.device, nll.dtype).clamp_min(1)
        per_row = -(2.0 / o.simnpo_beta) * F.logsigmoid(o.simnpo_beta * (per_token_nll - o.simnpo_delta))
        terms = {"loss/simnpo": row_mean(per_row, batch, harmful, "rows/negative")}
        weights = {"simnpo": o.simnpo_weight}
        if o.simnpo_retain_weight > 0:
            terms["loss/retain"] = cross_entropy(out, batch, batch["normal_rows"], tokens["normal"], "tokens/normal")
            weights["retain"] = o.simnpo_retain_weight
        return total(terms, weights)
