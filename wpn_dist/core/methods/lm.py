"""lm: a plain causal-LM step over every token of the same packed batch. It unlearns nothing: it is
the speed reference of the scaling study."""
from ..token_losses import response_cross_entropy
from . import register
from .base import Method, forward, normalizer, total


@register
class LM(Method):
    name = "lm"

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        out = forward(model, batch)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return total({"loss/lm": response_cross_entropy(out.logits, labels, batch.get("row_weights"),
                                                        normalizer(batch, "tokens/all"))}, {"lm": 1.0})
