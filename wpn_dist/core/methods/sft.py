"""sft: refusal fine-tuning, the reference row that shows what WPN's contrastive term adds. The
cross-entropy of the harmless response given the harmful prompt, plus a retain cross-entropy on
normal data: WPN's two auxiliary terms with no N-pair term (our baseline, not from a paper)."""
from dataclasses import dataclass, field
from typing import Literal

from . import register
from .base import Method, cross_entropy, forward, positive_rows, total


@dataclass
class SFTOptions:
    sft_retain_weight: float = field(default=1.0, metadata={
        "help": "sft: weight of the cross-entropy of normal responses (--normal_data; 0: none)."})
    sft_recovery_cuts: int = field(default=0, metadata={
        "help": "sft: also train the harmless response after this many evenly spaced cuts of each harmful "
                "response (safety-recovery augmentation, as WPN's --recovery_cuts with --recovery_lm_weight 1)."})
    sft_recovery_depths: Literal["even", "random"] = field(default="random", metadata={
        "help": "sft with --sft_recovery_cuts: evenly spaced cuts, or cuts drawn afresh every step (as WPN's "
                "--recovery_depths)."})
    sft_prompt_noise: float = field(default=0.0, metadata={
        "help": "sft: prompt noise, as WPN's --prompt_noise with --prompt_noise_pool data (0: prompts as written)."})

    def __post_init__(self):
        if self.sft_retain_weight < 0 or self.sft_recovery_cuts < 0:
            raise ValueError("--sft_retain_weight and --sft_recovery_cuts must be >= 0")
        if not 0 <= self.sft_prompt_noise <= 1:
            raise ValueError(f"--sft_prompt_noise must be within [0, 1], got {self.sft_prompt_noise}")


@register
class SFT(Method):
    name = "sft"
    Options = SFTOptions

    def row_groups(self) -> tuple:
        groups = ("recovery",) if self.options.sft_recovery_cuts > 0 else ()
        return groups + (("normal",) if self.options.sft_retain_weight > 0 else ())

    def batch_options(self) -> dict:
        return {"recovery_cuts": self.options.sft_recovery_cuts, "recovery_depths": self.options.sft_recovery_depths,
                "prompt_noise": self.options.sft_prompt_noise}

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        layout = batch["layout"]
        groups = {"positive": positive_rows(batch)}
        if self.options.sft_recovery_cuts > 0:
            groups["recovery"] = batch["recovery_rows"]
        if self.options.sft_retain_weight > 0:
            groups["normal"] = batch["normal_rows"]
        tokens = {name: layout.targets(rows) for name, rows in groups.items()}
        out = forward(model, batch, logits_for=tokens.values())
        terms = {f"loss/{term}": cross_entropy(out, batch, groups[name], tokens[name], f"tokens/{name}")
                 for name, term in (("positive", "positive_lm"), ("recovery", "recovery_lm"), ("normal", "retain"))
                 if name in groups}
        weights = {"positive_lm": 1.0, "recovery_lm": 1.0, "retain": self.options.sft_retain_weight}
        return total(terms, {name: w for name, w in weights.items() if f"loss/{name}" in terms})
