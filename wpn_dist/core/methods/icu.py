"""ICU (Tang et al. 2024, "Learn while Unlearn"), as their public code implements it:
``-icu_forget_weight * CE(forget sample) + icu_analogous_weight * CE(analogous sample)
+ icu_kl_weight * KL(reference || model) on the analogous sample``, where the forget sample is
``[prompt; harmful]`` and the analogous sample ``[prompt; harmless]``. Defaults are their code's.

Iterative unlearning refinement (``on_epoch_start``): before every epoch, the first included, the
current model continues each forget sample's prompt; a sample whose continuation no longer resembles
its harmful responses (sentence BLEU below ``--icu_bleu_threshold``) counts as unlearned and leaves
that epoch's loss. Flags are recomputed every epoch, so a sample can come back. When none remain,
training stops.

The second stopping rule (Jang et al. 2022, which ICU follows): at every epoch boundary the forget
samples' memorisation accuracy (greedy next-token accuracy, teacher-forced) and extraction likelihood
(the n-gram overlap of the model's continuation, from several prefixes of a harmful response, with the
rest of it) are measured; when both are below their thresholds, training stops. Their thresholds are
the values of text the model never saw, set per data set, so there are no defaults: the rule is on
when both ``--icu_ma_threshold`` and ``--icu_el_threshold`` are given. Our choices: words are
whitespace tokens, and the prefixes are ``--icu_el_prefixes`` evenly spaced lengths, not every one.

BLEU is computed here (no nltk): BLEU-4 on whitespace tokens against all harmful responses as
references, with the brevity penalty and, as nltk's ``sentence_bleu`` by default, no smoothing: a
continuation sharing no 4-gram with the references scores 0.
"""
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

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

    icu_ma_threshold: Optional[float] = field(default=None, metadata={
        "help": "ICU stopping rule: training stops at an epoch boundary when the forget samples' memorisation "
                "accuracy is below this and their extraction likelihood below --icu_el_threshold (give both; "
                "no default: their values for text the model never saw depend on the data)."})
    icu_el_threshold: Optional[float] = field(default=None, metadata={
        "help": "ICU stopping rule: the extraction likelihood threshold (see --icu_ma_threshold)."})
    icu_el_ngram: int = field(default=10, metadata={
        "help": "ICU stopping rule: n of the extraction likelihood's n-grams (Jang et al.'s 10; shorter "
                "responses use their own length)."})
    icu_el_prefixes: int = field(default=4, metadata={
        "help": "ICU stopping rule: how many evenly spaced prefix lengths of each harmful response the "
                "extraction likelihood continues from (our choice; the definition uses every one)."})

    def __post_init__(self):
        if (self.icu_ma_threshold is None) != (self.icu_el_threshold is None):
            raise ValueError("--icu_ma_threshold and --icu_el_threshold go together: give both or neither")
        if self.icu_el_ngram < 1 or self.icu_el_prefixes < 1:
            raise ValueError("--icu_el_ngram and --icu_el_prefixes must be at least 1")
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
        self.ma = self.el = None  # the stopping rule's last measures

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
        elif self.options.icu_ma_threshold is not None and self._memorisation_is_gone(run, examples):
            remembered = []
        run.set_epoch_subset(remembered)

    def _memorisation_is_gone(self, run, examples: list) -> bool:
        """The second stopping rule: memorisation accuracy and extraction likelihood of every harmful
        response, both below their thresholds."""
        o = self.options
        samples = [(e.prompt, h) for e in examples for h in e.harmful]
        self.ma = run.memorization_accuracy([{"prompt": p, "response": h} for p, h in samples])
        cases = [(i, t) for i, (_, h) in enumerate(samples)
                 for t in prefix_lengths(len(h.split()), o.icu_el_ngram, o.icu_el_prefixes)]
        continuations = run.generate([samples[i][0] for i, _ in cases],
                                     prefills=[" ".join(samples[i][1].split()[:t]) for i, t in cases])
        per_sample = {}
        for (i, t), text in zip(cases, continuations):
            words = samples[i][1].split()
            per_sample.setdefault(i, []).append(ngram_overlap(text.split(), words[t:], o.icu_el_ngram))
        self.el = sum(sum(v) / len(v) for v in per_sample.values()) / max(len(per_sample), 1)
        gone = self.ma < o.icu_ma_threshold and self.el < o.icu_el_threshold
        run.log(f"wpn_dist: ICU stopping rule before epoch {run.epoch}: memorisation accuracy {self.ma:.4f} "
                f"(threshold {o.icu_ma_threshold}), extraction likelihood {self.el:.4f} (threshold "
                f"{o.icu_el_threshold})" + ("; both below: training stops" if gone else ""))
        return gone

    def log_values(self) -> dict:
        values = {} if self.remaining is None else {"icu/remaining": self.remaining}
        if self.ma is not None:
            values.update({"icu/memorization_accuracy": self.ma, "icu/extraction_likelihood": self.el})
        return values

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


def prefix_lengths(length: int, n: int, count: int) -> list:
    """Up to ``count`` evenly spaced prefix lengths t of a ``length``-word response that leave at least
    n words to extract (t = 0, the prompt alone, always; a response of n words or fewer: only 0)."""
    last = max(length - n, 0)
    if count == 1 or last == 0:
        return [0]
    return sorted({round(k * last / (count - 1)) for k in range(count)})


def ngram_overlap(generated: list, truth: list, n: int) -> float:
    """Share of the distinct n-grams of ``truth`` that ``generated`` contains (n capped at len(truth))."""
    n = max(1, min(n, len(truth)))
    wanted = set(_ngrams(truth, n))
    return len(wanted & set(_ngrams(generated, n))) / len(wanted) if wanted else 0.0


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
