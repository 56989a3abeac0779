"""Prompt noise: the harmful prompts of a training step with some of their tokens replaced or followed
by tokens drawn from the training data (our choice, not the paper's; WPN's and sft's
``--prompt_noise``).

Unlearning trains the harmless answer on the phrasings the data set holds. On the toy world that
answer does not carry over to unseen phrasings or to prompts with words appended: the model answers
them with a bare "." or a broken sentence (README, "The efficacy table"). Training the harmless answer
on disturbed copies of the prompts teaches that the request, not its exact wording, decides the
answer.

Per step, each example is disturbed with probability one half (the other half of the time it is
trained as written). In a disturbed prompt every token of the prompt's own text (the prompt format's
fixed text around it is left alone) is replaced with probability ``rate``, or else followed by an
inserted token with probability ``rate / 2``. The tokens come from a pool of the training data's own
tokens, so no word outside it is ever shown: with ``--prompt_noise_pool data`` every token of the
training rows, prompts and responses (harmless, harmful and normal) alike; with ``prompts`` only those
of the training prompts and the normal data's prompts. The responses' words (the harm words, the
refusal's, the facts' colours and places) are often what attacks append, which is why the data pool
holds them. WPN's default is the prompts' pool on the toy world, where beside the tamper term's
disturbed targets (``--tamper_prompt_noise``) it is what meets seed 7's targets, and the data pool
elsewhere, as at the toy world's earlier defaults, which your models follow (README, "The efficacy
table", compares them).

With ``wrap`` (``--prompt_noise_wrap``) a disturbed prompt also gets, with that probability, a run of
pool tokens before its text or after it (either side alike), as long as the text at most twice:
attacks wrap a request in text of their own (a role to play, orders to obey, words appended), and
the token-level noise never puts more than one token between two of the prompt's.
The draws are seeded by (seed, step, example): every rank can tell what every other rank draws, and a
resumed run draws the same. An example's positive, negatives and recovery rows share its disturbed
prompt, so they still share their prompt's states in the packed layout."""
import random

DISTURBED_SHARE = 0.5  # the share of a step's examples whose prompt is disturbed
POOLS = ("data", "prompts")  # --prompt_noise_pool: the training rows' every token, or their prompts' only


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class PromptNoise:
    """``apply(pair_prompt_ids, example_id, step)`` -> the prompt ids of that example at that step."""

    def __init__(self, rate: float, tokenizer, prompt_format: str, prompts: list, seed: int, responses: list = (),
                 wrap: float = 0.0):
        """``prompts``: the prompt ids (formatted, as encoded) of every training example and normal row;
        ``responses``: response ids. The pool is every token of the prompts' own text and every token of
        the responses but the special ones (end of sequence, padding)."""
        if not 0 <= rate <= 1:
            raise ValueError(f"--prompt_noise must be within [0, 1], got {rate}")
        if not 0 <= wrap <= 1:
            raise ValueError(f"--prompt_noise_wrap must be within [0, 1], got {wrap}")
        self.rate, self.seed, self.wrap = rate, seed, wrap
        head, _, tail = prompt_format.partition("{prompt}")
        self.head_ids = tokenizer(head.rstrip(), add_special_tokens=True)["input_ids"] if head.strip() else []
        self.tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
        special = set(tokenizer.all_special_ids)
        self.pool = sorted({t for ids in prompts for t in ids[slice(*self.text_span(ids))]} |
                           {t for ids in responses for t in ids if t not in special})

    def text_span(self, prompt_ids: list) -> tuple:
        """(start, stop) of the prompt's own text inside ``prompt_ids``: after the format's head and
        before its tail (found by matching their tokens, so a tokenizer that merges across the
        boundary leaves that token to the text)."""
        start = _common_prefix(self.head_ids, prompt_ids)
        stop = len(prompt_ids) - _common_prefix(self.tail_ids[::-1], prompt_ids[start:][::-1])
        return start, max(start, stop)

    def apply(self, prompt_ids: list, example_id: int, step: int) -> list:
        rng = random.Random(f"{self.seed}-{step}-{example_id}-noise")
        if self.rate == 0 or not self.pool or rng.random() < 1 - DISTURBED_SHARE:
            return prompt_ids
        start, stop = self.text_span(prompt_ids)
        text = []
        for token in prompt_ids[start:stop]:
            draw = rng.random()
            if draw < self.rate:
                text.append(rng.choice(self.pool))
            elif draw < 1.5 * self.rate:
                text += [token, rng.choice(self.pool)]
            else:
                text.append(token)
        # Drawn after the tokens' draws, so that without a wrap the noise is what it always was.
        if self.wrap > 0 and text and rng.random() < self.wrap:
            run = [rng.choice(self.pool) for _ in range(rng.randint(1, 2 * len(text)))]
            text = run + text if rng.random() < 0.5 else text + run
        return prompt_ids[:start] + text + prompt_ids[stop:]
