"""ICU's iterative unlearning refinement (Tang et al. 2024): before training and after every epoch the
current model continues each forget sample's prompt; a sample whose continuation no longer resembles
its harmful responses (sentence BLEU below a threshold) counts as unlearned and leaves the next
epoch's loss. Flags are recomputed every epoch, so a sample can come back.

BLEU is computed here (no nltk): BLEU-4 on whitespace tokens against all harmful responses as
references, with the brevity penalty and, as nltk's ``sentence_bleu`` by default, no smoothing: a
continuation sharing no 4-gram with the references scores 0.
"""
import math
from collections import Counter

from .evaluate import generate


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


def still_remembered(model, tokenizer, examples: list, prompt_format: str, max_new_tokens: int,
                     batch_size: int, threshold: float) -> list:
    """Indices (into ``examples``, data.Example rows) whose greedy continuation scores BLEU >= threshold
    against the example's harmful responses. Collective: every rank calls it with the same list."""
    continuations = generate(model, tokenizer, [e.prompt for e in examples], prompt_format, max_new_tokens, batch_size)
    return [i for i, (e, text) in enumerate(zip(examples, continuations))
            if sentence_bleu(text, e.harmful) >= threshold]
