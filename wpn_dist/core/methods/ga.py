"""GA: gradient ascent as Yao, Xu and Liu (2023, "Large Language Model Unlearning") implement it:
``ga_weight * -CE(harmful) + ga_random_weight * CE(random normal answer | harmful prompt)
+ ga_kl_weight * KL(reference || model) on normal data``. Defaults are their code's."""
from dataclasses import dataclass, field

from . import register
from .base import Method, cross_entropy, forward, harmful_rows, kl, total


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

    def batch_options(self) -> dict:
        return {"positive_responses": False}  # GA never reads the harmless responses: not computed

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        o = self.options
        layout = batch["layout"]
        harmful, random_rows = harmful_rows(batch), batch["random_rows"]
        tokens = {"harmful": layout.targets(harmful), "random": layout.targets(random_rows)}
        if o.ga_kl_weight > 0:
            tokens["normal"] = layout.every_token(batch["normal_rows"])
        out = forward(model, batch, logits_for=tokens.values())
        terms = {"loss/ga": -cross_entropy(out, batch, harmful, tokens["harmful"], "tokens/negative"),
                 "loss/random": cross_entropy(out, batch, random_rows, tokens["random"], "tokens/random")}
        weights = {"ga": o.ga_weight, "random": o.ga_random_weight}
        if o.ga_kl_weight > 0:
            terms["loss/kl"] = kl(out, batch, batch["normal_rows"], tokens["normal"], reference, "attended/normal")
            weights["kl"] = o.ga_kl_weight
        return total(terms, weights)
