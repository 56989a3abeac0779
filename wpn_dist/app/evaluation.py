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
from .config import EvalArguments
from .data import PROMPT_FORMAT, TOY_MAX_LENGTH
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
def _teacher_forced(model, tokenizer, rows: list, prompt_format: str, max_length: int, batch_size: int, score):
    """Sum over this rank's share of ``rows`` ({prompt, response}) of ``score(logits, labels)`` -> (a
    number, a token count), for next-token ``logits`` [n, T-1, V] and ``labels`` [n, T-1] (-100 off the
    responses), then summed over ranks. Every rank runs the same number of batches (collective under
    ZeRO-3); a rank's padding slots run row 0 and are not counted."""
    from .data import encode_normal, lm_batch
    pairs = encode_normal(rows, tokenizer, prompt_format, max_length)
    share = rank_share(len(pairs))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    value, tokens = 0.0, 0
    for start in range(0, len(share), batch_size):
        indices = share[start:start + batch_size]
        count = sum(i is not None for i in indices)  # real rows come first
        batch = lm_batch([pairs[i if i is not None else 0] for i in indices], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:count, 1:].to(device)
        v, n = score(logits[:count, :-1].float(), labels)
        value, tokens = value + v, tokens + n
    if was_training:
        model.train()
    return distributed.all_reduce_sum(value), distributed.all_reduce_sum(tokens)


def perplexity(model, tokenizer, rows: list, prompt_format: str, max_length: int, batch_size: int) -> float:
    """Perplexity of the responses of ``rows`` ({prompt, response}) given their prompts, teacher-forced.
    Sharded over ranks with equal batch counts (collective under ZeRO-3)."""
    def nll(logits, labels):
        summed = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=-100, reduction="sum")
        return summed.item(), int((labels != -100).sum())
    total, tokens = _teacher_forced(model, tokenizer, rows, prompt_format, max_length, batch_size, nll)
    return math.exp(total / max(tokens, 1))


def memorization_accuracy(model, tokenizer, rows: list, prompt_format: str, max_length: int, batch_size: int) -> float:
    """Memorisation accuracy (Tirumala et al. 2022, as ICU and Jang et al. use it): the share of the
    response tokens of ``rows`` ({prompt, response}) that the model's greedy next-token prediction gets
    right, teacher-forced, pooled over the rows' tokens. Sharded like ``perplexity`` (collective)."""
    def right(logits, labels):
        counted = labels != -100
        return int(((logits.argmax(-1) == labels) & counted).sum()), int(counted.sum())
    hits, tokens = _teacher_forced(model, tokenizer, rows, prompt_format, max_length, batch_size, right)
    return hits / max(tokens, 1)


def evaluate_model(model, tokenizer, splits: dict, judge, normal_rows: list, prompt_format: str,
                   max_new_tokens: int, batch_size: int, max_length: int = 256, num_samples: int = 8,
                   extraction_rows: list | None = None, harmless_rows: list | None = None) -> dict:
    """Harmless and degenerate rates per split of harmful prompts, utility on normal data, and what is
    left to extract of the harmful responses.

    ``splits``: name -> list of prompts, or of (prompt, prefill) pairs whose answer is pre-started with
    ``prefill`` (then the continuation is judged); a split named "a/b" also counts toward an aggregate
    "a" (every attack of "adversarial", every depth of "prefill"). The judge's verdicts are harmful,
    harmless (and meaningful) or degenerate (judges.verdicts_of): only harmless counts as harmless.
    ``normal_rows``: {prompt, response[, answer]}: perplexity of the responses, and where rows carry an
    "answer" word, task accuracy = the greedy response contains it. ``extraction_rows``: {prompt,
    response} pairs of held-out harmful prompts and their harmful responses: their mean per-token
    log-likelihood (``harmless_rows``: the same for harmless responses). ``judge`` None: judge-free,
    only the degenerate rate. Collective: all ranks call it.
    Returns {"harmless_rate": {split: rate}, "degenerate_rate": {split: rate}, "perplexity": float,
    "qa_accuracy": rate | absent, "extraction_loglik": float | absent, "samples": {split: [...]}}."""
    from .judges import verdicts_of
    names = list(splits)
    items = [(x, "") if isinstance(x, str) else tuple(x) for name in names for x in splits[name]]
    prompts = [p for p, _ in items]
    answered = [r for r in normal_rows if r.get("answer")]
    responses = generate(model, tokenizer, prompts + [r["prompt"] for r in answered], prompt_format,
                         max_new_tokens, batch_size, prefills=[f for _, f in items] + [""] * len(answered))
    if judge is None:
        from .degeneracy import is_degenerate
        verdicts = ["degenerate" if is_degenerate(r) else "unjudged" for r in responses[:len(prompts)]]
    else:
        verdicts = verdicts_of(judge, prompts, responses[:len(prompts)], prefills=[f for _, f in items])
    result = {"harmless_rate": {}, "degenerate_rate": {}, "samples": {}}
    by_split, at = {}, 0
    for name in names:
        n = len(splits[name])
        chunk = verdicts[at:at + n]
        for key in [name] + ([name.split("/")[0]] if "/" in name else []):
            by_split.setdefault(key, []).extend(chunk)
        result["samples"][name] = [{"prompt": p, "prefill": f, "response": r, "verdict": v} for (p, f), r, v in
                                   list(zip(items[at:at + n], responses[at:at + n], chunk))[:num_samples]]
        at += n
    for name, chunk in by_split.items():
        if judge is not None:
            result["harmless_rate"][name] = rate_with_interval([v == "harmless" for v in chunk])
        result["degenerate_rate"][name] = rate_with_interval([v == "degenerate" for v in chunk])
    if answered:
        result["qa_accuracy"] = rate_with_interval(
            [r["answer"] in re.findall(r"\w+", out) for r, out in zip(answered, responses[len(prompts):])])
    if normal_rows:
        result["perplexity"] = perplexity(model, tokenizer, normal_rows, prompt_format, max_length, batch_size)
    if extraction_rows:
        result["extraction_loglik"] = -math.log(perplexity(model, tokenizer, extraction_rows, prompt_format,
                                                           max_length, batch_size))
    if harmless_rows:
        result["harmless_loglik"] = -math.log(perplexity(model, tokenizer, harmless_rows, prompt_format,
                                                         max_length, batch_size))
    return result


def toy_splits(world) -> dict:
    """The toy world's evaluation splits: held-out in-distribution prompts, unseen phrasings (OOD),
    every held-out prompt under each attack, and every held-out prompt with its answer pre-started by
    the opening of a harmful response at three depths (prefill)."""
    splits = {"id": [p for p, _ in world.heldout_prompts()], "ood": [p for p, _ in world.ood_prompts()]}
    for attack, prompt, _ in world.adversarial_prompts():
        splits.setdefault(f"adversarial/{attack}", []).append(prompt)
    for depth, prompt, prefill, _ in world.prefill_prompts():
        splits.setdefault(f"prefill/{depth}", []).append((prompt, prefill))
    return splits


def toy_normal_rows(world) -> list:
    """Utility data of the toy world: the facts of the objects outside the retain data."""
    return [{"prompt": q, "response": full, "answer": answer}
            for q, answer, full in world.qa_items(world.utility_objects())]


def read_eval_prompts(path: str) -> tuple:
    """Harmful evaluation prompts, a JSONL file of {prompt, split, harmful} rows (split default "eval";
    ``harmful``, optional: the prompt's harmful responses, a string or a list, for the extraction
    measure). Returns (split -> prompts, extraction rows {prompt, response})."""
    from .data import DataError, jsonl_rows
    splits, extraction = {}, []
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(f"{where}: a row must be a JSON object with a non-empty 'prompt'")
        splits.setdefault(str(row.get("split", "eval")), []).append(row["prompt"])
        harmful = row.get("harmful", [])
        for response in [harmful] if isinstance(harmful, str) else harmful:
            if not isinstance(response, str) or not response.strip():
                raise DataError(f"{where}: 'harmful' must be a string or a list of non-empty strings")
            extraction.append({"prompt": row["prompt"], "response": response})
    return splits, extraction


def evaluation_inputs(world, eval_prompts: str | None, normal_rows: list | None, judge: str,
                      judge_harmless_labels: str | None, heldout: list | None = None) -> tuple:
    """(splits, judge, normal rows, extraction rows, harmless rows) from the options: the toy world's
    unless ``eval_prompts`` (a path) or ``normal_rows`` (the rows of --normal_data, read by the caller)
    are given; else ``heldout`` (data.Example rows kept out of training), judged by a classifier
    ``judge`` or, with the toy world's ``rule`` judge, by judge-free measures only (judge None).
    Raises DataError/ValueError with a one-line message on bad input."""
    from .judges import make_judge
    harmless = None
    if eval_prompts:
        splits, extraction = read_eval_prompts(eval_prompts)
    elif world is not None:
        splits, extraction = toy_splits(world), world.extraction_rows()
    elif heldout:
        splits = {"heldout": [e.prompt for e in heldout]}
        extraction = [{"prompt": e.prompt, "response": r} for e in heldout for r in e.harmful]
        harmless = [{"prompt": e.prompt, "response": e.harmless} for e in heldout]
    else:
        raise ValueError("nothing to evaluate: give --eval_prompts (a JSONL file of {prompt, split} rows)")
    if normal_rows is None:
        normal_rows = toy_normal_rows(world) if world is not None else []
    judge_free = world is None and judge == "rule"
    return (splits, None if judge_free else make_judge(judge, judge_harmless_labels, world), normal_rows,
            extraction, harmless)


def format_table(results: dict) -> str:
    """Harmless rate per split and utility, before (if evaluated) and after."""
    columns = [c for c in ("before", "after") if c in results]

    def cell(r):
        return f"{100 * r['rate']:5.1f}% [{100 * r['low']:.0f}-{100 * r['high']:.0f}]"
    after = results["after"]
    lines = ["", f"{'':34}" + "".join(f"{c:>18}" for c in columns)]
    # Splits in the order they were given, each aggregate ("adversarial") before its parts ("adversarial/...").
    # Judge-free (no harmless rates), the degenerate rates name the splits.
    groups = list(dict.fromkeys(split.split("/")[0] for split in after.get("degenerate_rate") or after["harmless_rate"]))
    for split, rate in sorted(after["harmless_rate"].items(),
                              key=lambda kv: (groups.index(kv[0].split("/")[0]), "/" in kv[0], kv[0])):
        label = f"harmless, {split} ({rate['n']})" if "/" not in split else f"  {split.split('/')[1]} ({rate['n']})"
        lines.append(f"{label:34}" + "".join(f"{cell(results[c]['harmless_rate'][split]):>18}" for c in columns))
    if "qa_accuracy" in after:
        label = f"normal-QA accuracy ({after['qa_accuracy']['n']})"
        lines.append(f"{label:34}" + "".join(f"{cell(results[c]['qa_accuracy']):>18}" for c in columns))
    for split in [g for g in groups if g in after.get("degenerate_rate", {})]:
        label = f"degenerate, {split}"
        lines.append(f"{label:34}" + "".join(f"{cell(results[c]['degenerate_rate'][split]):>18}" for c in columns))
    if "perplexity" in after:
        lines.append(f"{'normal-data perplexity':34}" + "".join(f"{results[c]['perplexity']:>18.3f}" for c in columns))
    for key, label in (("extraction_loglik", "harmful log-lik / token"), ("harmless_loglik", "harmless log-lik / token")):
        if key in after:
            lines.append(f"{label:34}" + "".join(f"{results[c][key]:>18.3f}" for c in columns))
    lines.append("(number of prompts in brackets after each split; 95% bootstrap intervals; harmless counts only "
                 "meaningful answers, degenerate ones are counted apart)")
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
    max_length: int = field(default=TOY_MAX_LENGTH, metadata={
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
    distributed.check_launch()
    try:
        args = parse_evaluate_options(argv)
    except OptionError as e:
        distributed.fail(str(e))
    if argv is None and args.toy_seed is not None:  # the command line on the toy world: fixed kernels
        from .kernels import pin_toy_kernels
        pin_toy_kernels(distributed.print0)
    distributed.default_threads()

    from . import models, toy_world as toy
    from .data import DataError, read_normal_jsonl
    try:
        if args.zero3 and args.lm_eval_tasks:
            raise ValueError("--lm_eval_tasks needs the whole model on each rank: leave out --zero3")
        if args.lm_eval_tasks:  # now, not after the evaluation
            from .extras import missing_extra
            if problem := missing_extra("lmeval", "--lm_eval_tasks needs"):
                raise ValueError(problem)
        if not models.is_local_model_dir(args.model):
            raise ValueError(f"--model {args.model}: not a local Hugging Face model directory (no config.json)")
        world = toy.make_world(toy.ToyWorldConfig(seed=args.toy_seed)) if args.toy_seed is not None else None
        normal_rows = read_normal_jsonl(args.normal_data) if args.normal_data else None
        splits, judge, normal_rows, extraction, _ = evaluation_inputs(world, args.eval_prompts, normal_rows,
                                                                      args.judge, args.judge_harmless_labels)
        tokenizer = models.load_tokenizer(args.model, args.tokenizer)
    except (ValueError, DataError, OSError) as e:
        distributed.fail(str(e))
    distributed.init()
    loaded = _load_for_evaluation(args.model, tokenizer, args.zero3)
    model = loaded.module if args.zero3 else loaded  # the engine itself stays referenced in ``loaded``
    result = evaluate_model(model, tokenizer, splits, judge, normal_rows, args.prompt_format, args.max_new_tokens,
                            args.batch_size, args.max_length, num_samples=10**9, extraction_rows=extraction)
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
            from .versions import library_versions
            with open(os.path.join(args.out, "evaluation.json"), "w") as f:
                json.dump({**result, "versions": library_versions()}, f, indent=2)
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
