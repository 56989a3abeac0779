"""ICU (Tang et al. 2024, "Learn while Unlearn"), as their public code implements it:
``-icu_forget_weight * CE(forget sample) + icu_analogous_weight * CE(analogous sample)
+ icu_kl_weight * KL(reference || model) on the analogous sample``, where the forget sample is
``[prompt; harmful]`` and the analogous sample ``[prompt; harmless]``. Defaults are their code's.

Iterative unlearning refinement (``on_epoch_start``): before every epoch, the first included, the
current model continues each forget sample's prompt; a sample whose continuation no longer resembles
its harmful responses (sentence BLEU below ``--icu_bleu_threshold``) counts as unlearned and leaves
that epoch's loss. Flags are recomputed every epoch, so a sample can come back. When none remain,
training stops.

BLEU is computed here (no nltk): BLEU-4 on whitespace tokens against all harmful responses as
references, with the brevity penalty and, as nltk's ``sentence_bleu`` by default, no smoothing: a
continuation sharing no 4-gram with the references scores 0.
"""
import math
from collections import Counter
from dataclasses import dataclass, field

from . import register
from .base import Method, cross_entropy, forward, harmful_rows, kl, positive_rows, total


@dataclass
class ICUOptions:
    icu_forget_weight: float = field(default=1.0, metadata={"help": "ICU: weight of the negated CE of the forget sample."})
    icu_analogous_weight: float = field(default=0.5, metadata={"help": "ICU: weight of the CE of the analogous sample."})
    icu_kl_weight: float = field(default=1.0, metadata={
        "help": "ICU: weight of KL(original || model) on the analogous sample."})
    icu_bleu_threshold: float = field(default=0.01, metadata={
        "help": "ICU refinement: a forget sample whose continuation scores BLEU below this against its harmful "
                "responses counts as unlearned and leaves the next epoch."})

    def __post_init__(self):
        for name in ("icu_forget_weight", "icu_analogous_weight", "icu_kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")


@register
class ICU(Method):
    name = "icu"
    Options = ICUOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.remaining = None  # forget samples left after the last refinement

    def needs_reference(self) -> bool:
        return self.options.icu_kl_weight > 0

    def on_epoch_start(self, run) -> None:
        examples = run.examples()
        continuations = run.generate([e.prompt for e in examples])
        remembered = [i for i, (e, text) in enumerate(zip(examples, continuations))
                      if sentence_bleu(text, e.harmful) >= self.options.icu_bleu_threshold]
        self.remaining = len(remembered)
        run.log(f"wpn_dist: ICU refinement before epoch {run.epoch}: {len(remembered)} of {len(examples)} "
                f"forget samples remain")
        if not remembered:
            run.log("wpn_dist: ICU: every forget sample counts as unlearned; training stops")
        run.set_epoch_subset(remembered)

    def log_values(self) -> dict:
        return {} if self.remaining is None else {"icu/remaining": self.remaining}

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        o = self.options
        layout = batch["layout"]
        harmful, analogous = harmful_rows(batch), positive_rows(batch)
        tokens = {"forget": layout.targets(harmful), "analogous": layout.targets(analogous)}
        if o.icu_kl_weight > 0:
            tokens["kl"] = layout.every_token(analogous)
        out = forward(model, batch, logits_for=tokens.values())
        terms = {"loss/forget": -cross_entropy(out, batch, harmful, tokens["forget"], "tokens/negative"),
                 "loss/analogous": cross_entropy(out, batch, analogous, tokens["analogous"], "tokens/positive")}
        weights = {"forget": o.icu_forget_weight, "analogous": o.icu_analogous_weight}
        if o.icu_kl_weight > 0:
            terms["loss/kl"] = kl(out, batch, analogous, tokens["kl"], reference, "attended/positive")
            weights["kl"] = o.icu_kl_weight
        return total(terms, weights)


def _ngrams(tokens: list, n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(candidate: str, references: list, max_n: int = 4) -> float:
    hyp = candidate.split()
    refs = [r.split() for r in references]
    if not hyp:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = _ngrams(hyp, n)
        total = sum(counts.values())
        if total == 0:
            return 0.0  # candidate shorter than n: as nltk, no score
        max_ref = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref, n)
        matched = sum(min(c, max_ref[g]) for g, c in counts.items())
        if matched == 0:
            return 0.0
        log_precision += math.log(matched / total) / max_n
    closest = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    brevity = 1.0 if len(hyp) > closest else math.exp(1 - closest / len(hyp))
    return brevity * math.exp(log_precision)
