"""Evaluation by generation: greedy responses to held-out prompts, judged.

Generation is sharded over ranks and runs in lockstep (``synced_gpus``): under ZeRO-3 every forward
pass gathers parameters with collectives, so every rank keeps stepping until all ranks are done, and
every rank runs the same number of batches.
"""
import json
import math
import os
import random
import re

import torch

from . import distributed


def rank_share(num_items: int) -> list:
    """This rank's item indices, padded with None to the same count on every rank: under ZeRO-3 every
    rank must run the same number of forward passes."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = list(range(rank, num_items, world))
    return mine + [None] * (-(-num_items // world) - len(mine))


@torch.no_grad()
def generate(model, tokenizer, prompts: list, prompt_format: str, max_new_tokens: int, batch_size: int) -> list:
    """Greedy continuations of ``prompts`` (all ranks call this with the same list; collective)."""
    share = rank_share(len(prompts))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = {}
    for start in range(0, len(share), batch_size):
        indices = share[start:start + batch_size]
        # Padding slots generate for prompt 0 (to keep in step) and are not kept.
        texts = [prompt_format.format(prompt=prompts[i if i is not None else 0]) for i in indices]
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
                                   synced_gpus=distributed.world_size() > 1)
        for row, i in enumerate(indices):
            if i is not None:
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
    share = rank_share(len(pairs))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for start in range(0, len(share), batch_size):
        indices = share[start:start + batch_size]
        count = sum(i is not None for i in indices)  # real rows come first; padding runs pair 0, not counted
        batch = lm_batch([pairs[i if i is not None else 0] for i in indices], tokenizer.pad_token_id)
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
    """Utility data of the toy world: the facts of the objects outside the retain data."""
    return [{"prompt": q, "response": full, "answer": answer}
            for q, answer, full in world.qa_items(world.utility_objects())]


def read_eval_prompts(path: str) -> dict:
    """Harmful evaluation prompts, a JSONL file of {prompt, split} rows (split default "eval"),
    as split -> prompts."""
    from .data import DataError, jsonl_rows
    splits: dict = {}
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(f"{where}: a row must be a JSON object with a non-empty 'prompt'")
        splits.setdefault(str(row.get("split", "eval")), []).append(row["prompt"])
    return splits


def evaluation_inputs(world, eval_prompts: str | None, normal_rows: list | None, judge: str,
                      judge_harmless_labels: str | None) -> tuple:
    """(splits, judge, normal rows) from the options: the toy world's unless ``eval_prompts`` (a path)
    or ``normal_rows`` (the rows of --normal_data, read by the caller) are given.
    Raises DataError/ValueError with a one-line message on bad input."""
    from .judges import make_judge
    if eval_prompts:
        splits = read_eval_prompts(eval_prompts)
    elif world is not None:
        splits = toy_splits(world)
    else:
        raise ValueError("nothing to evaluate: give --eval_prompts (a JSONL file of {prompt, split} rows)")
    if normal_rows is None:
        normal_rows = toy_normal_rows(world) if world is not None else []
    return splits, make_judge(judge, judge_harmless_labels, world), normal_rows


def main(argv=None) -> dict:
    """``python -m wpn_dist.evaluate --model DIR [options]``: evaluate a saved model (for instance a run's
    ``hf/`` export). One process, or several under ``deepspeed``/``torchrun`` (generation sharded, the
    model partitioned with ZeRO-3 when ``--zero3``)."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    parser.add_argument("--toy_seed", type=int, default=None, help="evaluate on this toy world's splits")
    parser.add_argument("--eval_prompts", default=None, help="JSONL of {prompt, split} harmful prompts")
    parser.add_argument("--normal_data", default=None, help="JSONL of {prompt, response[, answer]} normal rows")
    parser.add_argument("--judge", default="rule", help="'rule' (toy world) or a classifier model directory")
    parser.add_argument("--judge_harmless_labels", default=None, help="classifier labels meaning harmless (a,b)")
    parser.add_argument("--prompt_format", default="### Question: {prompt} ### Answer:")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=256, help="token limit of normal rows (perplexity)")
    parser.add_argument("--zero3", action="store_true", help="partition the model over ranks with ZeRO-3")
    parser.add_argument("--lm_eval_tasks", default=None, help="comma-separated lm-evaluation-harness tasks")
    parser.add_argument("--lm_eval_limit", type=float, default=None, help="documents per task (or a fraction)")
    parser.add_argument("--lm_eval_mode", choices=("rank0", "sharded"), default="rank0")
    parser.add_argument("--lm_eval_include_path", default=None, help="directory of your own task YAMLs")
    parser.add_argument("--lm_eval_num_fewshot", type=int, default=None)
    parser.add_argument("--out", default=None, help="write evaluation.json and generations.jsonl here")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from . import models, toy
    from .data import DataError, read_normal_jsonl
    try:
        if args.zero3 and args.lm_eval_tasks:
            raise ValueError("--lm_eval_tasks needs the whole model on each rank: leave out --zero3")
        if not models.is_local_model_dir(args.model):
            raise ValueError(f"--model {args.model}: not a local Hugging Face model directory (no config.json)")
        world = toy.make_world(toy.ToyWorldConfig(seed=args.toy_seed)) if args.toy_seed is not None else None
        normal_rows = read_normal_jsonl(args.normal_data) if args.normal_data else None
        splits, judge, normal_rows = evaluation_inputs(world, args.eval_prompts, normal_rows, args.judge,
                                                       args.judge_harmless_labels)
        tokenizer = models.load_tokenizer(args.model, args.tokenizer)
    except (ValueError, DataError, OSError) as e:
        distributed.fail(str(e))
    distributed.init()
    loaded = _load_for_evaluation(args.model, tokenizer, args.zero3)
    model = loaded.module if args.zero3 else loaded  # the engine itself stays referenced in ``loaded``
    result = evaluate_model(model, tokenizer, splits, judge, normal_rows, args.prompt_format, args.max_new_tokens,
                            args.batch_size, args.max_length, num_samples=10**9)
    if args.lm_eval_tasks:
        from .harness import run_lm_eval
        result["lm_eval"] = run_lm_eval(model, tokenizer, [t.strip() for t in args.lm_eval_tasks.split(",")],
                                        include_path=args.lm_eval_include_path, limit=args.lm_eval_limit,
                                        num_fewshot=args.lm_eval_num_fewshot, batch_size=args.batch_size,
                                        mode=args.lm_eval_mode)
    generations = result.pop("samples")
    if distributed.is_main():
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "evaluation.json"), "w") as f:
                json.dump(result, f, indent=2)
            with open(os.path.join(args.out, "generations.jsonl"), "w") as f:
                for split, rows in generations.items():
                    for row in rows:
                        f.write(json.dumps({"split": split, **row}) + "\n")
        for split, rate in result["harmless_rate"].items():
            print(f"harmless rate, {split}: {100 * rate['rate']:.1f}% [{100 * rate['low']:.1f}-{100 * rate['high']:.1f}] "
                  f"of {rate['n']}")
        if "qa_accuracy" in result:
            print(f"task accuracy: {100 * result['qa_accuracy']['rate']:.1f}% of {result['qa_accuracy']['n']}")
        if "perplexity" in result:
            print(f"perplexity of normal responses: {result['perplexity']:.3f}")
        for task, metrics in result.get("lm_eval", {}).items():
            print(f"lm-eval {task} ({metrics.get('num_docs', '?')} documents): " +
                  ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    distributed.shutdown()
    return result


def _load_for_evaluation(path: str, tokenizer, zero3: bool):
    """The model on this rank's device; with ``zero3`` a frozen engine partitioned over ranks."""
    from transformers import AutoModelForCausalLM
    if not zero3:
        return AutoModelForCausalLM.from_pretrained(path).to(distributed.device()).eval()
    from transformers.integrations import HfDeepSpeedConfig
    from . import engine as engine_lib
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    keep_alive = HfDeepSpeedConfig(config)  # noqa: F841 (partition while loading)
    return engine_lib.initialize_reference(AutoModelForCausalLM.from_pretrained(path), config)


if __name__ == "__main__":
    main()
    distributed.exit_now()
