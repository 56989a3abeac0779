"""Representation rerouting, the circuit breakers' loss (Zou et al. 2024, "Improving Alignment and
Robustness with Circuit Breakers"): on harmful completions the states of some layers are pushed
away from the frozen original model's (their cosine similarity, where positive, is the loss), and on
retain data they are held to them (L2 distance):
``c_rr(t) * mean ReLU(cos(h, h_frozen))`` over the harmful responses' tokens and the layers
``+ c_retain(t) * mean |h - h_frozen|_2`` over the normal rows' tokens and the layers, with
``c_rr = alpha (1 - t / 2T)`` and ``c_retain = alpha t / 2T`` at step t of T.
Defaults: alpha 10 and layers a third and two thirds deep (their 10 and 20 of Llama-3-8B's 32), as
their code sets them; they train LoRA adapters, here every parameter trains (our choice)."""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import register
from .base import Method, forward, harmful_rows, reference_states, token_mean, total


@dataclass
class RROptions:
    rr_alpha: float = field(default=10.0, metadata={"help": "RR: the schedule's scale alpha."})
    rr_layers: str = field(default="", metadata={
        "help": "RR: comma-separated hidden-state indices (into output_hidden_states) the loss reads. Default: "
                "a third and two thirds deep (our reading of their layers 10 and 20 of 32)."})

    def __post_init__(self):
        if self.rr_alpha < 0:
            raise ValueError(f"--rr_alpha must be >= 0, got {self.rr_alpha}")
        try:
            self.layer_list
        except ValueError:
            raise ValueError(f"--rr_layers must be comma-separated integers, got {self.rr_layers!r}") from None

    @property
    def layer_list(self) -> list:
        return [int(x) for x in self.rr_layers.split(",") if x.strip()]


def default_layers(num_layers: int) -> list:
    return sorted({max(1, num_layers // 3), max(1, 2 * num_layers // 3)})


@register
class RR(Method):
    name = "rr"
    Options = RROptions

    def __init__(self, options=None):
        super().__init__(options)
        self.progress = 0.0  # t / T of the step about to run (set by on_step_start)

    def row_groups(self) -> tuple:
        return ("normal",)

    def needs_reference(self) -> bool:
        return True

    def batch_options(self) -> dict:
        return {"positive_responses": False}

    def on_step_start(self, run) -> None:
        self.progress = run.step / max(run.total_steps, 1)

    def coefficients(self) -> tuple:
        """(c_rr, c_retain) at the current step."""
        a = self.options.rr_alpha
        return a * (1 - self.progress / 2), a * self.progress / 2

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        layout = batch["layout"]
        harmful, normal = harmful_rows(batch), batch["normal_rows"]
        out = forward(model, batch, hidden_states=True)
        layers = self.options.layer_list or default_layers(len(out.out.hidden_states) - 1)
        rows = torch.cat([harmful, normal])
        sub = layout.select(rows)  # the frozen model runs over the harmful and normal rows only
        frozen = reference_states(reference, {"layout": sub})
        n = harmful.shape[0]
        sub_harmful = sub.span(range(n))
        sub_normal = sub.every_token(range(n, rows.shape[0]))
        harmful_tokens, normal_tokens = layout.span(harmful), layout.every_token(normal)
        reroute, retain = 0.0, 0.0
        for layer in layers:
            h, h0 = out.hidden(layer).float(), frozen.hidden(layer).float()
            cosine = F.cosine_similarity(h[harmful_tokens.flat], h0[sub_harmful.flat], dim=-1)
            reroute = reroute + token_mean(F.relu(cosine), batch, harmful, harmful_tokens, "tokens/negative")
            distance = (h[normal_tokens.flat] - h0[sub_normal.flat]).norm(dim=-1)
            retain = retain + token_mean(distance, batch, normal, normal_tokens, "attended/normal")
        c_rr, c_retain = self.coefficients()
        terms = {"loss/reroute": reroute / len(layers), "loss/retain": retain / len(layers)}
        return total(terms, {"reroute": c_rr, "retain": c_retain})

    def log_values(self) -> dict:
        c_rr, c_retain = self.coefficients()
        return {"rr/c_reroute": c_rr, "rr/c_retain": c_retain}
