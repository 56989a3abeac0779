"""Evaluation by generation: greedy responses to held-out prompts, judged.

Generation is sharded over ranks and runs in lockstep (``synced_gpus``): under ZeRO-3 every forward
pass gathers parameters with collectives, so every rank keeps stepping until all ranks are done, and
every rank runs the same number of batches.
"""
import math
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


@torch.no_grad()
def perplexity(model, tokenizer, rows: list, prompt_format: str, max_length: int, batch_size: int) -> float:
    """Perplexity of the responses of ``rows`` ({prompt, response}) given their prompts, teacher-forced.
    Sharded over ranks with equal batch counts (collective under ZeRO-3)."""
    from .data import encode_normal, lm_batch
    pairs = encode_normal(rows, tokenizer, prompt_format, max_length)
    rank, world = distributed.rank(), distributed.world_size()
    mine = pairs[rank::world]
    per_rank = -(-len(pairs) // world)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for start in range(0, per_rank, batch_size):
        chunk = mine[start:start + batch_size] or pairs[:1]  # a rank with nothing left still runs the forward
        count = len(mine[start:start + batch_size])
        batch = lm_batch(chunk, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:count, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(logits[:count, :-1].float().reshape(-1, logits.shape[-1]),
                                                   labels.reshape(-1), ignore_index=-100, reduction="sum")
        nll += losses.item()
        tokens += int((labels != -100).sum())
    if was_training:
        model.train()
    nll, tokens = distributed.all_reduce_sum(nll), distributed.all_reduce_sum(tokens)
    return math.exp(nll / max(tokens, 1))


def evaluate_model(model, tokenizer, splits: dict, judge, normal_rows: list, prompt_format: str,
                   max_new_tokens: int, batch_size: int, max_length: int = 256, num_samples: int = 8) -> dict:
    """Harmless rate per split of harmful prompts, and utility on normal data.

    ``splits``: name -> list of prompts; a split named "a/b" also counts toward an aggregate "a"
    (e.g. every attack of "adversarial"). ``judge(prompts, responses) -> [bool]`` (True = harmless).
    ``normal_rows``: {prompt, response[, answer]}: perplexity of the responses, and where rows carry
    an "answer" word, task accuracy = the greedy response contains it. Collective: all ranks call it.
    Returns {"harmless_rate": {split: rate}, "perplexity": float, "qa_accuracy": rate | absent,
    "samples": {split: [{prompt, response, harmless}]}}."""
    names = list(splits)
    prompts = [p for name in names for p in splits[name]]
    answered = [r for r in normal_rows if r.get("answer")]
    responses = generate(model, tokenizer, prompts + [r["prompt"] for r in answered], prompt_format,
                         max_new_tokens, batch_size)
    verdicts = judge(prompts, responses[:len(prompts)])
    result = {"harmless_rate": {}, "samples": {}}
    flags_by_split, at = {}, 0
    for name in names:
        n = len(splits[name])
        flags = verdicts[at:at + n]
        flags_by_split.setdefault(name, []).extend(flags)
        if "/" in name:
            flags_by_split.setdefault(name.split("/")[0], []).extend(flags)
        result["samples"][name] = [{"prompt": p, "response": r, "harmless": h} for p, r, h in
                                   list(zip(splits[name], responses[at:at + n], flags))[:num_samples]]
        at += n
    for name, flags in flags_by_split.items():
        result["harmless_rate"][name] = rate_with_interval(flags)
    if answered:
        result["qa_accuracy"] = rate_with_interval(
            [r["answer"] in re.findall(r"\w+", out) for r, out in zip(answered, responses[len(prompts):])])
    if normal_rows:
        result["perplexity"] = perplexity(model, tokenizer, normal_rows, prompt_format, max_length, batch_size)
    return result


def toy_splits(world) -> dict:
    """The toy world's evaluation splits: held-out in-distribution prompts, unseen phrasings (OOD),
    and every held-out prompt under each attack."""
    splits = {"id": [p for p, _ in world.heldout_prompts()], "ood": [p for p, _ in world.ood_prompts()]}
    for attack, prompt, _ in world.adversarial_prompts():
        splits.setdefault(f"adversarial/{attack}", []).append(prompt)
    return splits


def toy_normal_rows(world) -> list:
    return [{"prompt": q, "response": full, "answer": answer} for q, answer, full in world.qa_items()]


def evaluate_toy(model, tokenizer, world, prompt_format: str, max_new_tokens: int, batch_size: int,
                 judge=None, splits: dict | None = None, utility: bool = True) -> dict:
    """evaluate_model on the toy world's splits (default: all), judged by its rule unless ``judge``;
    utility (QA accuracy, perplexity) unless ``utility=False``."""
    judge = judge or (lambda prompts, responses: [world.judge(r) for r in responses])
    return evaluate_model(model, tokenizer, splits or toy_splits(world), judge,
                          toy_normal_rows(world) if utility else [], prompt_format, max_new_tokens, batch_size)
