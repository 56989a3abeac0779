"""GA: gradient ascent as Yao, Xu and Liu (2023, "Large Language Model Unlearning") implement it:
``ga_weight * -CE(harmful) + ga_random_weight * CE(random normal answer | harmful prompt)
+ ga_kl_weight * KL(reference || model) on normal data``. Defaults are their code's."""
from dataclasses import dataclass, field

from ..token_losses import kl_to_reference, response_cross_entropy
from . import register
from .base import Method, forward, harmful_rows, normalizer, reference_logits, row_weights, total


@dataclass
class GAOptions:
    ga_weight: float = field(default=0.5, metadata={"help": "GA: weight of the negated cross-entropy of harmful responses."})
    ga_random_weight: float = field(default=1.0, metadata={
        "help": "GA: weight of the cross-entropy of random normal responses given the harmful prompt."})
    ga_kl_weight: float = field(default=1.0, metadata={
        "help": "GA: weight of KL(original || model) on normal data (the original is a second, frozen engine)."})

    def __post_init__(self):
        for name in ("ga_weight", "ga_random_weight", "ga_kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")


@register
class GA(Method):
    name = "ga"
    Options = GAOptions

    def row_groups(self) -> tuple:
        return ("random", "normal")

    def needs_reference(self) -> bool:
        return self.options.ga_kl_weight > 0

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        o = self.options
        out = forward(model, batch)
        harmful, random_rows = harmful_rows(batch), batch["random_rows"]
        terms = {"loss/ga": -response_cross_entropy(out.logits[harmful], batch["labels"][harmful],
                                                    row_weights(batch, harmful), normalizer(batch, "tokens/negative")),
                 "loss/random": response_cross_entropy(out.logits[random_rows], batch["labels"][random_rows],
                                                       row_weights(batch, random_rows), normalizer(batch, "tokens/random"))}
        weights = {"ga": o.ga_weight, "random": o.ga_random_weight}
        if o.ga_kl_weight > 0:
            rows = batch["normal_rows"]
            terms["loss/kl"] = kl_to_reference(out.logits[rows], reference_logits(reference, batch, rows),
                                               batch["attention_mask"][rows], row_weights(batch, rows),
                                               normalizer(batch, "attended/normal"))
            weights["kl"] = o.ga_kl_weight
        return total(terms, weights)
