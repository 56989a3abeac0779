"""lm: a plain causal-LM step over every token of the same packed batch. It unlearns nothing: it is
the speed reference of the scaling study."""
from . import register
from .base import Method, all_rows, cross_entropy, forward, total


@register
class LM(Method):
    name = "lm"

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        rows = all_rows(batch)
        tokens = batch["layout"].targets(rows, start=1)  # every token but each sequence's first
        out = forward(model, batch, logits_for=[tokens])
        return total({"loss/lm": cross_entropy(out, batch, rows, tokens, "tokens/all")}, {"lm": 1.0})
