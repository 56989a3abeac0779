"""Entry point: ``deepspeed wpn_dist/train.py [--config run.yaml] [--option value ...]``
(or ``python wpn_dist/train.py`` as one process).

With no options it runs the embedded default: the toy world's implanted model is unlearned with WPN
under ZeRO-3 and evaluated before and after on held-out prompts.
"""
import json
import os
import shutil
import signal
import sys
import time
import warnings

if __package__ in (None, ""):  # run as a script: make the package importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

# DeepSpeed still calls the collectives torch 2.13 deprecated, once per step per rank.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                        category=FutureWarning)

from wpn_dist import distributed, faults, toy
from wpn_dist.config import ConfigError, RunConfig, parse_config
from wpn_dist.data import BatchMaker, DataError, ShardedSampler, detect_format, encode_examples, examples_from_rows, \
    read_jsonl, read_normal_jsonl, read_pku_saferlhf
from wpn_dist.evaluate import evaluate_model, evaluation_inputs
from wpn_dist.methods import extra_row_groups, needs_reference

# Exit status of a run that stopped early on a signal after saving a checkpoint: "requeue me".
STOPPED_EXIT_CODE = 99
TOY_LR = 5e-4
DEFAULT_LR = 1e-5


def resolve_defaults(cfg: RunConfig) -> None:
    """Options whose default depends on the run: the toy world's tiny model wants larger steps."""
    is_toy = cfg.model.model == "toy"
    if cfg.train.lr is None:
        cfg.train.lr = TOY_LR if is_toy else DEFAULT_LR
    # The toy world's WPN defaults come from the toy benchmark's ablation (README, "The efficacy table").
    toy_wpn = is_toy and cfg.method.method == "wpn"
    if cfg.method.positive_lm_weight is None:
        cfg.method.positive_lm_weight = 1.0 if toy_wpn else 0.0
    if cfg.method.retain_weight is None:
        cfg.method.retain_weight = 1.0 if toy_wpn else 0.0
    if cfg.data.normal_data is None and cfg.data.data == "toy":
        cfg.data.normal_data = "toy"
    if is_toy and cfg.data.data != "toy":
        raise ConfigError("--model toy (the default) is the toy world's model; with your own --data pass --model too")


def load_data(cfg: RunConfig, tokenizer, world, user_normal_rows: list | None) -> tuple:
    """Read, validate and encode the unlearning data, and pick the normal data if the method uses it
    (the rows of --normal_data, or the toy world's). Returns (examples, encoded examples, normal rows or
    None, notes for the log)."""
    data = cfg.data
    fmt = data.data_format
    if data.data == "toy":
        examples = examples_from_rows(world.unlearning_rows(), "toy world")
        fmt, skipped = "toy", 0
    else:
        if fmt == "auto":
            fmt = detect_format(data.data)
        if fmt == "jsonl":
            examples, skipped = read_jsonl(data.data), 0
        else:
            examples, skipped = read_pku_saferlhf(data.data, data.data_split)
    encoded, dropped, truncated = encode_examples(examples, tokenizer, data.prompt_format, data.max_length,
                                                  data.overlong, source=data.data)
    notes = f"{len(encoded)} examples from {data.data} ({fmt})"
    if skipped or dropped or truncated:
        notes += f"; {skipped} prompts skipped (no safe or no unsafe response), {dropped} dropped as overlong, " \
                 f"{truncated} responses truncated to --max_length {data.max_length}"
    normal_rows = None
    if {"normal", "random"} & set(extra_row_groups(cfg.method)):
        if data.normal_data is None:
            raise ConfigError(f"--method {cfg.method.method} with these options needs --normal_data "
                              f"(a JSONL file of {{prompt, response}} rows)")
        normal_rows = world.normal_rows() if data.normal_data == "toy" else user_normal_rows
        notes += f"; {len(normal_rows)} normal rows from {data.normal_data}"
    return examples, encoded, normal_rows, notes


def check_output_dir(out: str, overwrite: bool, resume: str) -> None:
    if os.path.isdir(out) and os.listdir(out) and not overwrite and resume == "never":
        raise ConfigError(f"--output_dir {out} already holds a run; continue it with --resume auto, "
                          f"choose another directory, or pass --overwrite_output_dir")


def default_run_dir(cfg: RunConfig) -> str:
    """runs/<method>-<model>-<time>, the same on every rank (collective: rank 0's clock)."""
    stamp = distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
    return os.path.join("runs", f"{cfg.method.method}-{os.path.basename(cfg.model.model.rstrip('/'))}-{stamp}")


def batch_to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


class StopSignal:
    """Remembers SIGUSR1/SIGTERM (Slurm's warning before a time limit, preemption) so that the loop can
    checkpoint at the next step boundary and exit with STOPPED_EXIT_CODE, for the job to requeue."""

    def __init__(self):
        self.received = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True


class DataCursor:
    """Where the loop is in the data: epoch and micro-batches consumed in it. With the sampler's
    deterministic per-epoch order this is all a resumed run needs to see the same batches.
    ``subset`` (example indices; default all) is what an epoch covers: ICU's refinement narrows it."""

    def __init__(self, make_sampler, subset: list, epoch: int = 0, index: int = 0):
        self.make_sampler, self.epoch, self.index = make_sampler, epoch, index
        self._start(subset)

    def _start(self, subset: list) -> None:
        self.subset = list(subset)
        order = self.make_sampler(len(self.subset)).micro_batches(self.epoch) if self.subset else []
        self._order = [[self.subset[i] for i in micro] for micro in order]

    def epoch_done(self) -> bool:
        return self.index == len(self._order)

    def start_epoch(self, subset: list | None = None) -> None:
        self.epoch, self.index = self.epoch + 1, 0
        self._start(self.subset if subset is None else subset)

    def next(self) -> list:
        if self.epoch_done():
            self.start_epoch()
        self.index += 1
        return self._order[self.index - 1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "subset": self.subset}


def main(argv=None) -> dict:
    # From the start: a stop signal while the model loads still ends in a checkpoint and a requeue.
    stop_signal = StopSignal()
    # 1. Options, model name and data are validated before anything is started or written.
    try:
        cfg = parse_config(argv)
        resolve_defaults(cfg)
        world = toy.make_world(toy.ToyWorldConfig(seed=cfg.data.toy_seed)) if cfg.data.data == "toy" else None
        from wpn_dist import models
        if cfg.model.model == "toy":
            tokenizer = toy.make_tokenizer(world)
        else:
            tokenizer = models.load_tokenizer(cfg.model.model, cfg.model.tokenizer)
        # --normal_data is read once: training (GA, retain terms) and evaluation (utility) both use it.
        user_normal_rows = None
        if cfg.data.normal_data not in (None, "toy"):
            user_normal_rows = read_normal_jsonl(cfg.data.normal_data)
        examples, encoded, normal_rows, data_notes = load_data(cfg, tokenizer, world, user_normal_rows)
        batches = BatchMaker(encoded, examples, tokenizer, cfg.data.prompt_format, cfg.data.max_length,
                             extra_row_groups(cfg.method), normal_rows, cfg.train.seed)
        evaluation = None
        if cfg.eval.evaluate and (world is not None or cfg.eval.eval_prompts):
            evaluation = evaluation_inputs(world, cfg.eval.eval_prompts, user_normal_rows, cfg.eval.judge,
                                           cfg.eval.judge_harmless_labels)
        if cfg.train.output_dir is not None:
            check_output_dir(cfg.train.output_dir, cfg.train.overwrite_output_dir, cfg.train.resume)
    except (ValueError, OSError) as e:  # ConfigError, DataError and bad judge options
        distributed.fail(str(e))

    # 2. Process group, run directory, resolved config.
    distributed.init()
    if cfg.train.output_dir is None:
        cfg.train.output_dir = default_run_dir(cfg)
    run_dir = cfg.train.output_dir
    if distributed.is_main():
        if cfg.train.overwrite_output_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    distributed.barrier()
    distributed.print0(f"wpn_dist: run directory {run_dir}; world size {distributed.world_size()}; {data_notes}")

    # 3. The toy world's base model is implanted once (rank 0) and cached.
    model_name = cfg.model.model
    if model_name == "toy":
        implant_cfg = toy.ImplantConfig()
        model_name = toy.implant_dir(world.config, implant_cfg)
        if distributed.is_main() and not os.path.isdir(model_name):
            distributed.print0(f"wpn_dist: implanting the toy model (once; cached in {model_name})")
            toy.implant(world, implant_cfg, model_name, log=distributed.print0)
        distributed.barrier()

    # 4. Engine. Under ZeRO-3 the HfDeepSpeedConfig must exist while from_pretrained runs, so that
    #    weights are partitioned as they load instead of materialising whole on every rank.
    from wpn_dist import checkpoint, engine as engine_lib, models
    from wpn_dist.metrics import RunLogger, memory_gib
    ds_config = engine_lib.build_ds_config(cfg.train, cfg.train.lr, distributed.world_size())
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    hf_ds_config = None
    if engine_lib.zero_stage(ds_config) == 3 and cfg.model.model_init == "pretrained":
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 (kept alive on purpose)
    model = models.load_model(model_name, tokenizer, cfg.model.model_init, dtype, cfg.train.seed)
    if cfg.train.activation_checkpointing:
        # Non-reentrant: works with one packed forward per step and ZeRO-3's gradient hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    engine, _, _ = engine_lib.initialize(model, ds_config)
    device = engine.device
    reference = None
    if needs_reference(cfg.method):  # the frozen original model, for the baselines' KL terms
        reference = engine_lib.initialize_reference(
            models.load_model(model_name, tokenizer, cfg.model.model_init, dtype, cfg.train.seed), ds_config)

    # 5. Resume, or evaluate before unlearning.
    def make_sampler(num_examples):
        return ShardedSampler(num_examples, cfg.train.micro_batch_size, distributed.rank(),
                              distributed.world_size(), cfg.train.seed)
    cursor, first_step, results = DataCursor(make_sampler, range(len(encoded))), 1, {}
    evaluate_now = None
    if cfg.eval.evaluate and evaluation is not None:
        splits, judge, normal_rows_eval = evaluation

        def evaluate_now(only_first_split=False):
            chosen = dict([next(iter(splits.items()))]) if only_first_split else splits
            result = evaluate_model(engine.module, tokenizer, chosen, judge, [] if only_first_split else normal_rows_eval,
                                    cfg.data.prompt_format, cfg.eval.max_new_tokens, cfg.eval.eval_batch_size,
                                    cfg.data.max_length)
            # Forward passes without backward leave ZeRO-3's gathered parameters in place: release them.
            engine.empty_partition_cache()
            return result
    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = checkpoint.newest_complete(run_dir, log=distributed.print0)
    elif cfg.train.resume != "never":
        problem = checkpoint.problem_with(cfg.train.resume)
        if problem:
            distributed.fail(f"--resume {cfg.train.resume}: {problem}")
        resume_from = cfg.train.resume
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from)
        cursor = DataCursor(make_sampler, state.get("subset", range(len(encoded))), state["epoch"], state["index"])
        first_step, results = state["step"] + 1, state.get("results", {})
        distributed.print0(f"wpn_dist: resumed from {resume_from} at step {state['step']}")
    else:
        if evaluate_now is not None and cfg.eval.evaluate_before:
            results["before"] = evaluate_now()
        if cfg.method.method == "icu":  # ICU's refinement also runs before training
            cursor = DataCursor(make_sampler, icu_remembered(engine, tokenizer, cfg, encoded, batches))

    # 6. The loop: one packed forward, the loss, backward, step; metrics every log_every steps;
    #    a checkpoint every save_every steps and at the end.
    from wpn_dist.methods import loss_terms
    logger = RunLogger(run_dir, cfg.train.steps, distributed.is_main())
    logger.advance(first_step - 1)
    window_start, window_tokens, total_tokens = time.time(), 0, 0
    started = time.time()
    last_loss, last_saved, last_step = float("nan"), resume_from, first_step - 1
    engine.train()
    for step in range(first_step, cfg.train.steps + 1):
        if cfg.method.anchor == "generation" and cfg.method.method == "wpn" and \
                (step == first_step or (step - 1) % cfg.method.anchor_refresh_steps == 0):
            batches.set_anchors(continuations(engine, tokenizer, cfg, encoded, batches))
        if cfg.method.method == "icu" and cursor.epoch_done():
            cursor.start_epoch(icu_remembered(engine, tokenizer, cfg, encoded, batches))
        if not cursor.subset:
            distributed.print0(f"wpn_dist: ICU: every forget sample counts as unlearned; stopping before step {step}")
            break
        for micro in range(cfg.train.gradient_accumulation_steps):
            batch = batch_to(batches.make(cursor.next(), step, micro, distributed.rank()), device)
            terms = loss_terms(engine, batch, cfg.method, reference)
            if faults.injected("nan_at_step", step):
                terms["loss/total"] = terms["loss/total"] * float("nan")
            # Collective, every step: all ranks stop together, before a bad step touches the weights.
            if distributed.all_reduce_max(int(not torch.isfinite(terms["loss/total"]).item())):
                logger.close()
                distributed.fail(f"non-finite loss at step {step}; the last good checkpoint is "
                                 f"{last_saved or 'none (no checkpoint was saved)'}, left as it was", code=3)
            engine.backward(terms["loss/total"])
            engine.step()
            window_tokens += int(batch["attention_mask"].sum())
        last_step = step
        logger.advance()
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            # Collectives: every rank reaches this at the same steps.
            row = {name: distributed.all_reduce_mean(value.item()) for name, value in terms.items()}
            seconds = time.time() - window_start
            tokens = distributed.all_reduce_sum(window_tokens)
            steps_in_window = cfg.train.log_every if step % cfg.train.log_every == 0 else step % cfg.train.log_every
            row.update({"lr": engine.get_lr()[0], "step_time(s)": seconds / steps_in_window,
                        "throughput(tokens/s)": tokens / seconds, **memory_gib()})
            if cfg.method.method == "icu":
                row["icu/remaining"] = len(cursor.subset)
            last_loss = row["loss/total"]
            logger.log(step, row)
            total_tokens += tokens
            window_start, window_tokens = time.time(), 0
        if evaluate_now is not None and cfg.eval.eval_every and step % cfg.eval.eval_every == 0:
            rates = evaluate_now(only_first_split=True)["harmless_rate"]
            logger.log(step, {"eval/harmless_rate": next(iter(rates.values()))["rate"]})
            window_start = time.time()  # evaluation time is not step time
        if faults.injected("usr1_last_rank_at_step", step) and distributed.rank() == distributed.world_size() - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        # Collective, every step: a stop signal on any rank stops all ranks at this step boundary.
        stop_requested = bool(distributed.all_reduce_max(int(stop_signal.received)))
        if stop_requested or step == cfg.train.steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
            last_saved = checkpoint.save(engine, run_dir, step, {"step": step, "results": results, **cursor.state()},
                                         keep=cfg.train.keep_checkpoints)
        if stop_requested and step < cfg.train.steps:
            logger.close()
            distributed.print0(f"wpn_dist: stop signal: checkpoint {last_saved} saved at step {step}; "
                               f"exiting with status {STOPPED_EXIT_CODE} (continue with --resume auto)")
            distributed.shutdown()  # so that the exit status stays 99 (see shutdown and exit_now)
            distributed.exit_now(STOPPED_EXIT_CODE)
        faults.crash_if_injected("exit_after_step", step)
    if last_step < cfg.train.steps and last_step >= first_step:  # stopped early (ICU): save where it stopped
        last_saved = checkpoint.save(engine, run_dir, last_step, {"step": last_step, "results": results,
                                                                  **cursor.state()}, keep=cfg.train.keep_checkpoints)
    logger.close()
    wall_seconds = time.time() - started

    # 7. Evaluation after, Hugging Face export, summary.
    if evaluate_now is not None:
        results["after"] = evaluate_now()
    if cfg.train.export_hf:
        from wpn_dist.export import export_hf
        export_hf(engine, tokenizer, os.path.join(run_dir, "hf"))
    summary = {"method": cfg.method.method, "model": cfg.model.model, "world_size": distributed.world_size(),
               "steps": cfg.train.steps, "steps_run": last_step, "first_step": first_step, "tokens": int(total_tokens),
               "wall_seconds": round(wall_seconds, 2), "final_loss": last_loss,
               "checkpoint": last_saved, "evaluation": results or None}
    if distributed.is_main():
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if "after" in results:
            print(format_table(results), flush=True)
        print(f"wpn_dist: done in {wall_seconds:.0f}s; summary in {os.path.join(run_dir, 'summary.json')}", flush=True)
    distributed.shutdown()
    return summary


def continuations(engine, tokenizer, cfg: RunConfig, encoded: list, batches: BatchMaker) -> dict:
    """The model's greedy continuation of every training prompt (collective): WPN's generation anchors."""
    from wpn_dist.evaluate import generate
    ids = [e.example_id for e in encoded]
    texts = generate(engine.module, tokenizer, [batches.examples[i].prompt for i in ids], cfg.data.prompt_format,
                     cfg.eval.max_new_tokens, cfg.eval.eval_batch_size)
    engine.empty_partition_cache()
    return dict(zip(ids, texts))


def icu_remembered(engine, tokenizer, cfg: RunConfig, encoded: list, batches: BatchMaker) -> list:
    """ICU's refinement: indices (into ``encoded``) of the forget samples the model still reproduces."""
    from wpn_dist.icu import still_remembered
    remembered = still_remembered(engine.module, tokenizer, [batches.examples[e.example_id] for e in encoded],
                                  cfg.data.prompt_format, cfg.eval.max_new_tokens, cfg.eval.eval_batch_size,
                                  cfg.method.icu_bleu_threshold)
    engine.empty_partition_cache()
    distributed.print0(f"wpn_dist: ICU refinement: {len(remembered)} of {len(encoded)} forget samples remain")
    return remembered


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


if __name__ == "__main__":
    main()
    distributed.exit_now()
