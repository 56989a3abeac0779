"""Evaluation by generation: greedy responses to held-out prompts, judged (wpn_dist.app.generation
shards the generation over ranks), and utility on normal data. ``main`` is ``python -m wpn_dist.evaluate``."""
import argparse
import inspect
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from . import distributed
from .config import DataArguments, EvalArguments
from .data import PROMPT_FORMAT
from .generation import generate, rank_share  # noqa: F401 (evaluation's own use and re-export)
from .options import OptionError, parse_options


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


def format_table(results: dict) -> str:
    """Harmless rate per split and utility, before (if evaluated) and after."""
    columns = [c for c in ("before", "after") if c in results]

    def cell(r):
        return f"{100 * r['rate']:5.1f}% [{100 * r['low']:.0f}-{100 * r['high']:.0f}]"
    after = results["after"]
    lines = ["", f"{'':34}" + "".join(f"{c:>18}" for c in columns)]
    # Splits in the order they were given, each aggregate ("adversarial") before its parts ("adversarial/...").
    groups = list(dict.fromkeys(split.split("/")[0] for split in after["harmless_rate"]))
    for split, rate in sorted(after["harmless_rate"].items(),
                              key=lambda kv: (groups.index(kv[0].split("/")[0]), "/" in kv[0], kv[0])):
        label = f"harmless, {split} ({rate['n']})" if "/" not in split else f"  {split.split('/')[1]} ({rate['n']})"
        lines.append(f"{label:34}" + "".join(f"{cell(results[c]['harmless_rate'][split]):>18}" for c in columns))
    if "qa_accuracy" in after:
        label = f"normal-QA accuracy ({after['qa_accuracy']['n']})"
        lines.append(f"{label:34}" + "".join(f"{cell(results[c]['qa_accuracy']):>18}" for c in columns))
    if "perplexity" in after:
        lines.append(f"{'normal-data perplexity':34}" + "".join(f"{results[c]['perplexity']:>18.3f}" for c in columns))
    lines.append("(number of prompts in brackets after each split; 95% bootstrap intervals)")
    return "\n".join(lines)


@dataclass
class EvaluateOptions:
    """The options of ``python -m wpn_dist.evaluate``. Defaults shared with training are the trainer's
    (wpn_dist.app.config)."""
    model: str = field(metadata={"help": "A local Hugging Face model directory (e.g. a run's hf/ export)."})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "Tokenizer directory (default: the model's)."})
    toy_seed: Optional[int] = field(default=None, metadata={
        "help": "Evaluate on the splits (and the normal QA data) of the toy world of this seed."})
    eval_prompts: Optional[str] = field(default=None, metadata={
        "help": "Harmful prompts, a JSONL file of {prompt, split} rows (split optional)."})
    normal_data: Optional[str] = field(default=None, metadata={
        "help": "Normal data, a JSONL file of {prompt, response[, answer]} rows: perplexity, task accuracy."})
    judge: str = field(default=EvalArguments.judge, metadata={
        "help": "'rule' (toy world) or a local Hugging Face sequence-classification model directory."})
    judge_harmless_labels: Optional[str] = field(default=None, metadata={
        "help": "With a classifier --judge: comma-separated label names (or ids) that mean harmless."})
    prompt_format: str = field(default=PROMPT_FORMAT, metadata={
        "help": "Template around each prompt; the response follows after a space."})
    max_new_tokens: int = field(default=EvalArguments.max_new_tokens, metadata={
        "help": "Tokens generated per prompt."})
    batch_size: int = field(default=EvalArguments.eval_batch_size, metadata={
        "help": "Prompts (or normal rows) per batch per rank."})
    max_length: int = field(default=DataArguments.max_length, metadata={
        "help": "Token limit of prompt + response of a normal row (perplexity)."})
    zero3: bool = field(default=False, metadata={"help": "Partition the model over the ranks with ZeRO-3."})
    lm_eval_tasks: Optional[str] = field(default=None, metadata={
        "help": "Comma-separated lm-evaluation-harness tasks, groups or tags (pip install -e '.[lmeval]')."})
    lm_eval_limit: Optional[float] = field(default=None, metadata={
        "help": "At most this many documents per task (below 1: that fraction); for quick checks."})
    lm_eval_mode: Literal["rank0", "sharded"] = field(default="rank0", metadata={
        "help": "Several ranks: rank 0 evaluates everything, or every rank scores a share of each task."})
    lm_eval_include_path: Optional[str] = field(default=None, metadata={
        "help": "A directory (or YAML file) of task configs of your own."})
    lm_eval_num_fewshot: Optional[int] = field(default=None, metadata={
        "help": "Few-shot examples (default: each task's own setting, else 0)."})
    out: Optional[str] = field(default=None, metadata={"help": "Write evaluation.json and generations.jsonl here."})
    local_rank: int = field(default=-1, metadata={"help": argparse.SUPPRESS})  # set by the deepspeed launcher


def parse_evaluate_options(argv=None) -> EvaluateOptions:
    """defaults < --config file < command line; raises OptionError (one line) on a bad option."""
    (options,), _ = parse_options((EvaluateOptions,), argv, prog="python -m wpn_dist.evaluate",
                                  description=inspect.cleandoc(main.__doc__))
    return options


def main(argv=None) -> dict:
    """``python -m wpn_dist.evaluate --model DIR [options]``: evaluate a saved model (for instance a run's
    ``hf/`` export). One process, or several under ``deepspeed``/``torchrun`` (generation sharded, the
    model partitioned with ZeRO-3 when ``--zero3``)."""
    try:
        args = parse_evaluate_options(argv)
    except OptionError as e:
        distributed.fail(str(e))

    from . import models, toy_world as toy
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
