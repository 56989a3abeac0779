"""RMU (Li et al. 2024, "The WMDP Benchmark", representation misdirection for unlearning): the
states of one layer on the forget data are pushed toward a fixed random direction scaled by a
steering coefficient, and the same layer's states on the retain data are held to the frozen
original model's:
``rmu_forget_weight * MSE(h_l(forget), c u) + rmu_alpha * MSE(h_l(normal), h_l_frozen(normal))``,
MSE averaged over tokens and dimensions, ``u`` a unit vector drawn once from ``rmu_seed``.
Defaults (c 6.5, alpha 1200) are the paper's for Zephyr-7B, stated as such; they depend on the model.
Our choices: the forget tokens are the harmful responses' tokens of ``[prompt; harmful]``, the retain
data the normal rows; every parameter trains (their code updates three MLPs); the default layer is
the output of the layer a quarter deep (their layer 7 of 32), at least the first."""
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import register
from .base import Method, forward, harmful_rows, reference_states, token_mean, total


@dataclass
class RMUOptions:
    rmu_layer: Optional[int] = field(default=None, metadata={
        "help": "RMU: the hidden state (an index into output_hidden_states) whose forget states are steered and "
                "retain states held. Default: a quarter deep (our reading of their layer 7 of 32)."})
    rmu_steering_coeff: float = field(default=6.5, metadata={"help": "RMU: the norm c of the random target."})
    rmu_alpha: float = field(default=1200.0, metadata={"help": "RMU: weight of the retain term."})
    rmu_forget_weight: float = field(default=1.0, metadata={"help": "RMU: weight of the forget term."})
    rmu_seed: int = field(default=0, metadata={"help": "RMU: seed of the random direction (the same on every rank)."})

    def __post_init__(self):
        for name in ("rmu_steering_coeff", "rmu_alpha", "rmu_forget_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")


def default_layer(num_layers: int) -> int:
    """The hidden-state index a quarter of the way through the layers (1 = the first layer's output)."""
    return max(1, num_layers // 4)


def mean_squared(a: torch.Tensor, b: torch.Tensor, batch: dict, rows, tokens, key: str) -> torch.Tensor:
    """Mean over ``tokens`` (normalised by the step's ``key``) of the mean over dimensions of (a - b)^2."""
    return token_mean((a.float() - b.float()).pow(2).mean(-1), batch, rows, tokens, key)


@register
class RMU(Method):
    name = "rmu"
    Options = RMUOptions

    def row_groups(self) -> tuple:
        return ("normal",)

    def needs_reference(self) -> bool:
        return self.options.rmu_alpha > 0

    def batch_options(self) -> dict:
        return {"positive_responses": False}

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        o = self.options
        layout = batch["layout"]
        harmful, normal = harmful_rows(batch), batch["normal_rows"]
        out = forward(model, batch, hidden_states=True)
        layer = o.rmu_layer if o.rmu_layer is not None else default_layer(len(out.out.hidden_states) - 1)
        hidden = out.hidden(layer)
        forget = layout.span(harmful)
        generator = torch.Generator().manual_seed(o.rmu_seed)
        direction = torch.rand(hidden.shape[-1], generator=generator)
        target = (o.rmu_steering_coeff * direction / direction.norm()).to(hidden.device)
        terms = {"loss/forget": mean_squared(hidden[forget.flat], target.expand(forget.flat.shape[0], -1), batch,
                                             harmful, forget, "tokens/negative")}
        weights = {"forget": o.rmu_forget_weight}
        if o.rmu_alpha > 0:
            retain = layout.every_token(normal)
            sub = layout.select(normal)  # the frozen model runs over the normal rows only
            frozen = reference_states(reference, {"layout": sub}).hidden(layer)
            frozen = frozen[sub.every_token(range(len(sub.sequences))).flat]  # row-major, as ``retain``
            terms["loss/retain"] = mean_squared(hidden[retain.flat], frozen, batch, normal, retain, "attended/normal")
            weights["retain"] = o.rmu_alpha
        return total(terms, weights)
