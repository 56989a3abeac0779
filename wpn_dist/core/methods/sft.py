"""sft: refusal fine-tuning, the reference row that shows what WPN's contrastive term adds. The
cross-entropy of the harmless response given the harmful prompt, plus a retain cross-entropy on
normal data: WPN's two auxiliary terms with no N-pair term (our baseline, not from a paper)."""
from dataclasses import dataclass, field

from ..token_losses import response_cross_entropy
from . import register
from .base import Method, forward, normalizer, positive_rows, row_weights, total


@dataclass
class SFTOptions:
    sft_retain_weight: float = field(default=1.0, metadata={
        "help": "sft: weight of the cross-entropy of normal responses (--normal_data; 0: none)."})
    sft_recovery_cuts: int = field(default=0, metadata={
        "help": "sft: also train the harmless response after this many evenly spaced cuts of each harmful "
                "response (safety-recovery augmentation, as WPN's --recovery_cuts with --recovery_lm_weight 1)."})

    def __post_init__(self):
        if self.sft_retain_weight < 0 or self.sft_recovery_cuts < 0:
            raise ValueError("--sft_retain_weight and --sft_recovery_cuts must be >= 0")


@register
class SFT(Method):
    name = "sft"
    Options = SFTOptions

    def row_groups(self) -> tuple:
        groups = ("recovery",) if self.options.sft_recovery_cuts > 0 else ()
        return groups + (("normal",) if self.options.sft_retain_weight > 0 else ())

    def batch_options(self) -> dict:
        return {"recovery_cuts": self.options.sft_recovery_cuts}

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        out = forward(model, batch)
        positives = positive_rows(batch)
        terms = {"loss/positive_lm": response_cross_entropy(out.logits[positives], batch["labels"][positives],
                                                            row_weights(batch, positives),
                                                            normalizer(batch, "tokens/positive"))}
        weights = {"positive_lm": 1.0}
        if self.options.sft_recovery_cuts > 0:
            rows = batch["recovery_rows"]
            terms["loss/recovery_lm"] = response_cross_entropy(out.logits[rows], batch["labels"][rows],
                                                               row_weights(batch, rows), normalizer(batch, "tokens/recovery"))
            weights["recovery_lm"] = 1.0
        if self.options.sft_retain_weight > 0:
            rows = batch["normal_rows"]
            terms["loss/retain"] = response_cross_entropy(out.logits[rows], batch["labels"][rows],
                                                          row_weights(batch, rows), normalizer(batch, "tokens/normal"))
            weights["retain"] = self.options.sft_retain_weight
        return total(terms, weights)
