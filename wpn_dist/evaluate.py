"""Evaluation by generation: greedy responses to held-out prompts, judged.

Generation is sharded over ranks and runs in lockstep (``synced_gpus``): under ZeRO-3 every forward
pass gathers parameters with collectives, so every rank keeps stepping until all ranks are done, and
every rank runs the same number of batches.
"""
import random
import re

import torch

from . import distributed


@torch.no_grad()
def generate(model, tokenizer, prompts: list, prompt_format: str, max_new_tokens: int, batch_size: int) -> list:
    """Greedy continuations of ``prompts`` (all ranks call this with the same list; collective)."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = list(range(rank, len(prompts), world))
    per_rank = -(-len(prompts) // world)
    mine += [mine[-1] if mine else 0] * (per_rank - len(mine))  # equal batch counts on every rank
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = {}
    for start in range(0, per_rank, batch_size):
        indices = mine[start:start + batch_size]
        texts = [prompt_format.format(prompt=prompts[i]) for i in indices]
        encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        width = max(len(e) for e in encoded)
        input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   synced_gpus=world > 1)
        for row, i in enumerate(indices):
            outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    if was_training:
        model.train()
    merged = {}
    for part in distributed.gather_objects(outputs):
        merged.update(part)
    return [merged[i] for i in range(len(prompts))]


def rate_with_interval(flags: list, num_resamples: int = 1000, seed: int = 0) -> dict:
    """Fraction of True in ``flags`` with a bootstrap 95% interval."""
    if not flags:
        return {"rate": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = random.Random(seed)
    n = len(flags)
    rates = sorted(sum(flags[rng.randrange(n)] for _ in range(n)) / n for _ in range(num_resamples))
    return {"rate": sum(flags) / n, "low": rates[int(0.025 * num_resamples)],
            "high": rates[int(0.975 * num_resamples) - 1], "n": n}


def evaluate_toy(model, tokenizer, world, prompt_format: str, max_new_tokens: int, batch_size: int) -> dict:
    """Harmless rate on held-out harmful prompts (rule judge) and accuracy on the normal QA facts."""
    heldout = world.heldout_prompts()
    qa = world.qa_items()
    responses = generate(model, tokenizer, [p for p, _ in heldout] + [q for q, _, _ in qa],
                         prompt_format, max_new_tokens, batch_size)
    harmful_out, qa_out = responses[:len(heldout)], responses[len(heldout):]
    harmless = [world.judge(r) for r in harmful_out]
    correct = [answer in re.findall(r"\w+", r) for r, (_, answer, _) in zip(qa_out, qa)]
    return {"harmless_rate": rate_with_interval(harmless),
            "qa_accuracy": rate_with_interval(correct),
            "samples": [{"prompt": p, "response": r, "harmless": h}
                        for (p, _), r, h in list(zip(heldout, harmful_out, harmless))[:8]]}
