"""One grid point of the scaling study, measured in the real engine. Started on every rank by the
DeepSpeed launcher (``wpn_dist.scaling`` does this)::

    python -m deepspeed.launcher.runner --num_gpus W --master_port P wpn_dist/bench/scaling/worker.py \\
        --point point.json --result result.json

What it does: builds the point's model with random weights (the spec's own vocabulary, so the
embedding and LM head have their real size), wraps it in a DeepSpeed engine configured from
``ds_configs/`` exactly as train.py does (plus the frozen reference engine for ga and icu), makes
synthetic batches of random tokens in the point's layout (every row ``seq_len`` tokens with a
``prompt_len`` prompt, or PKU-like lengths; K negatives per example sharing the example's prompt),
and runs
``warmup_steps + steps`` steps of ``methods.loss_terms`` + ``engine.backward`` + ``engine.step``.
Each step is timed between device synchronisations (torch.cuda.synchronize on GPU); the time of a
step is the slowest rank's. Rank 0 writes the raw measurements as JSON to ``--result``.
"""
import dataclasses
import json
import os
import resource
import sys
import time
import warnings

if __package__ in (None, ""):  # run as a script by the launcher: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import torch

warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                        category=FutureWarning)

from wpn_dist.app import distributed  # noqa: E402
from wpn_dist.app.data import batch_to_device  # noqa: E402
from wpn_dist.core import packed_attention  # noqa: E402
from wpn_dist.app.options import OptionError, parse_options  # noqa: E402

LR = 1e-5
PAD_ID, BOS_ID, EOS_ID = 1, 2, 2
FIRST_ORDINARY_ID = 4  # random token ids start above the special ids


class SyntheticVocab:
    """What ``models.load_model`` reads from a tokenizer (its length and special ids). Token ids are
    random, so no tokenizer is needed; the model keeps its spec's vocabulary size."""

    pad_token_id, bos_token_id, eos_token_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


class CountingReference:
    """The frozen reference engine, counting the tokens it is fed (for the FLOPs of its forward)."""

    def __init__(self, engine):
        self.engine, self.module, self.tokens = engine, engine.module, 0

    def __call__(self, **inputs):
        packed = "position_ids" in inputs  # packed: every token of the row is real
        self.tokens += int(inputs["input_ids"].numel() if packed else inputs["attention_mask"].sum())
        return self.engine(**inputs)


VARIANTS = {"zero0": "zero2", "zero3_offload_optimizer": "zero3_offload"}  # derived config -> its base file


def apply_variant(config: dict, name: str) -> dict:
    """``zero0``: the base config with ZeRO switched off; ``zero3_offload_optimizer``: zero3_offload
    without parameter offload (only the optimizer on CPU). Other names: unchanged."""
    if name == "zero0":
        config["zero_optimization"] = {"stage": 0}
    elif name == "zero3_offload_optimizer":
        config["zero_optimization"].pop("offload_param", None)
    return config


def raw_ds_config(name: str) -> dict:
    """The point's DeepSpeed JSON before its "auto" values are filled (for train.py's --ds_config)."""
    from wpn_dist.app.engine import read_ds_config
    return apply_variant(read_ds_config(VARIANTS.get(name, name)), name)


def ds_config_for(point: dict, world_size: int) -> dict:
    """The DeepSpeed config of the point: a file of ds_configs/ filled in by engine.build_ds_config, as
    train.py does, then made into the derived variant if the point names one."""
    from wpn_dist.app import engine
    from wpn_dist.app.config import TrainArguments
    name = point["ds_config"]
    train = TrainArguments(micro_batch_size=point["micro_batch"], steps=point["warmup_steps"] + point["steps"],
                           warmup_steps=2, ds_config=VARIANTS.get(name, name), precision=point["precision"],
                           activation_checkpointing=point["activation_checkpointing"], seed=point["seed"])
    return apply_variant(engine.build_ds_config(train, LR, world_size), name)


PKU_PROMPT_TOKENS, PKU_RESPONSE_TOKENS = (20, 80), (50, 300)  # uniform ranges of lengths "pku"


def synthetic_batch(point: dict, vocab_size: int, groups: tuple, rank: int, step: int,
                    positive_responses: bool = True) -> dict:
    """A batch (data.pack_batch, in the point's layout) of random token ids: micro_batch examples, each
    a positive and K negatives sharing its prompt, plus micro_batch rows per extra group of the method
    (ga: random answers to the example's prompt, normal rows with their own prompt). Lengths: every
    row ``seq_len`` tokens with a ``prompt_len`` prompt, or PKU-like (prompt 20..80, each response
    50..300 tokens, uniform). The same seed gives the same tokens in either layout."""
    from wpn_dist.app.data import EncodedExample, EncodedPair, pack_batch
    generator = torch.Generator().manual_seed(point["seed"] * 1_000_003 + rank * 10_007 + step)

    def tokens(n: int) -> list:
        return torch.randint(FIRST_ORDINARY_ID, vocab_size, (n,), generator=generator).tolist()

    def uniform(bounds: tuple) -> int:
        return int(torch.randint(bounds[0], bounds[1] + 1, (1,), generator=generator))

    pku = point["lengths"] == "pku"

    def new_prompt() -> list:
        return tokens(uniform(PKU_PROMPT_TOKENS) if pku else point["prompt_len"])

    def row(prompt: list) -> EncodedPair:
        return EncodedPair(prompt + tokens(uniform(PKU_RESPONSE_TOKENS) if pku else point["seq_len"] - len(prompt)),
                           len(prompt))

    examples, prompts = [], []
    for i in range(point["micro_batch"]):
        prompt = new_prompt()
        prompts.append(prompt)
        examples.append(EncodedExample(rank * point["micro_batch"] + i, row(prompt),
                                       [row(prompt) for _ in range(point["negatives"])]))
    extra = {group: [row(prompt if group != "normal" else new_prompt()) for prompt in prompts] for group in groups}
    owners = {group: list(range(len(prompts))) for group in groups if group != "normal"}
    batch = pack_batch(examples, PAD_ID, extra, layout=point["layout"], owners=owners,
                       positive_responses=positive_responses)
    if point["method"] == "lm" and point["layout"] == "packed":
        batch = useful_tokens_batch(batch)
    return batch


def useful_tokens_batch(batch: dict) -> dict:
    """The lm reference at equal useful tokens: each sequence's own tokens (without the start it shares)
    as a sequence of its own, packed without padding; the LM step then runs over exactly the distinct
    tokens the WPN step computes."""
    from wpn_dist.core.packing import Layout, Sequence
    layout = batch["layout"]
    own = [Sequence(s.token_ids[s.own_start:], 0) for s in layout.sequences]
    return {**batch, "layout": Layout(own, "packed", layout.pad_id)}


def peak_memory() -> dict:
    """This rank's peak memory: GPU allocations (torch.cuda.max_memory_allocated) and host peak RSS."""
    out = {"host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}
    if torch.cuda.is_available() and not distributed.on_cpu():
        out.update(gpu_max_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   gpu_max_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    return out


def _point_options(options_class, point: dict):
    """The method's options for a scaling point: its defaults, with WPN's recovery terms off (the
    synthetic batch has no recovery rows), its positive-LM term on only if the point says so, and its
    negatives local or global as the point says."""
    names = {f.name for f in dataclasses.fields(options_class)}
    given = {"positive_lm_weight": 1.0 if point.get("positive_lm") else 0.0, "recovery_cuts": 0,
             "global_negatives": bool(point["global_negatives"])}
    return options_class(**{k: v for k, v in given.items() if k in names})


def measure(point: dict) -> dict:
    from wpn_dist.app import engine as engine_lib, models
    from wpn_dist.core.methods import build_method, method_class
    spec = models.MODEL_SPECS[point["model"]]
    longest = PKU_PROMPT_TOKENS[1] + PKU_RESPONSE_TOKENS[1] if point["lengths"] == "pku" else point["seq_len"]
    if longest > spec.max_positions:
        raise ValueError(f"seq_len {point['seq_len']} is longer than {spec.name}'s {spec.max_positions} positions")
    on_gpu = not distributed.on_cpu()
    distributed.init()
    world, rank = distributed.world_size(), distributed.rank()
    dtype = torch.bfloat16 if point["precision"] == "bf16" else torch.float32
    vocab = SyntheticVocab(spec.vocab_size)
    ds_config = ds_config_for(point, world)

    started = time.perf_counter()
    model = models.load_model(spec.name, vocab, init="random", dtype=dtype, seed=point["seed"])
    if point["activation_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if point["layout"] == "packed" and not packed_attention.install(model):
        raise ValueError(f"{spec.name}: packed attention does not support this architecture; use layout: padded")
    engine, _, _ = engine_lib.initialize(model, ds_config)
    method = build_method(point["method"], _point_options(method_class(point["method"]).Options, point))
    reference = None
    if method.needs_reference():
        reference_model = models.load_model(spec.name, vocab, init="random", dtype=dtype, seed=point["seed"])
        packed_attention.install(reference_model)
        reference = CountingReference(engine_lib.initialize_reference(reference_model, ds_config))
    setup_s = time.perf_counter() - started

    total = point["warmup_steps"] + point["steps"]
    groups = method.row_groups()
    positive_responses = method.batch_options().get("positive_responses", True)
    batches = [synthetic_batch(point, spec.vocab_size, groups, rank, step, positive_responses)
               for step in range(total)]
    # useful tokens per step, this rank: distinct tokens (response tokens plus one prompt per example)
    tokens = sum(b["layout"].distinct_tokens() for b in batches) // total
    executed = sum(b["layout"].num_executed_tokens() for b in batches) // total
    rows = len(batches[0]["layout"].sequences)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    engine.train()
    times, losses = [], []
    for cpu_batch in batches:
        sync()
        t0 = time.perf_counter()
        batch = batch_to_device(dict(cpu_batch), engine.device)
        terms = method.loss_terms(engine, batch, reference)
        with packed_attention.active(batch["layout"]):
            engine.backward(terms["loss/total"])
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(terms["loss/total"].item()))
    reference_tokens = reference.tokens // total if reference is not None else 0

    # Collective: every rank's numbers, combined on every rank.
    ranks = distributed.gather_objects({"times": times, "losses": losses, "tokens": tokens, "rows": rows,
                                        "executed": executed,
                                        "reference_tokens": reference_tokens, **peak_memory()})
    step_times = [max(r["times"][i] for r in ranks) for i in range(total)]
    result = {"setup_s": setup_s, "step_times_s": step_times[point["warmup_steps"]:],
              "warmup_step_times_s": step_times[:point["warmup_steps"]],
              "rows_per_step": sum(r["rows"] for r in ranks), "tokens_per_step": sum(r["tokens"] for r in ranks),
              "executed_tokens_per_step": sum(r["executed"] for r in ranks),
              "useful_token_fraction": sum(r["tokens"] for r in ranks) / sum(r["executed"] for r in ranks),
              "reference_tokens_per_step": sum(r["reference_tokens"] for r in ranks),
              "loss_first": sum(r["losses"][0] for r in ranks) / world,
              "loss_last": sum(r["losses"][-1] for r in ranks) / world,
              "host_peak_rss_gib": max(r["host_peak_rss_gib"] for r in ranks),
              "zero_stage": engine_lib.zero_stage(ds_config), "world_size_run": world}
    if on_gpu:
        result["gpu_max_allocated_gib"] = max(r["gpu_max_allocated_gib"] for r in ranks)
        result["gpu_max_reserved_gib"] = max(r["gpu_max_reserved_gib"] for r in ranks)
    return result


@dataclasses.dataclass
class WorkerOptions:
    point: str = dataclasses.field(metadata={"help": "JSON file of the point's full config."})
    result: str = dataclasses.field(metadata={"help": "JSON file rank 0 writes the measurements to."})
    local_rank: int = dataclasses.field(default=-1, metadata={"help": "Set by the deepspeed launcher."})


def main(argv=None) -> None:
    try:
        (args,), _ = parse_options((WorkerOptions,), argv, prog="wpn_dist/bench/scaling/worker.py",
                                   description="One scaling-study point (started by wpn_dist.scaling).")
    except OptionError as e:
        distributed.fail(str(e))
    with open(args.point) as f:
        point = json.load(f)
    result = measure(point)
    if distributed.is_main():
        from wpn_dist.bench.scaling.metrics import machine
        result.update(machine(not distributed.on_cpu()))
        with open(args.result + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(args.result + ".tmp", args.result)
        median = sorted(result["step_times_s"])[len(result["step_times_s"]) // 2]
        print(f"scaling_worker: {result['tokens_per_step']} tokens/step, median step {median:.4f}s", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
    distributed.exit_now()
