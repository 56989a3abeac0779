"""The trainer behind ``deepspeed wpn_dist/train.py``: it builds a run's parts in one order and owns
the run's state.

With no options it runs the embedded default: the toy world's implanted model is unlearned with WPN
under ZeRO-3 and evaluated before and after on held-out prompts.

What the trainer owns (``Trainer.state_dict``): the step, the data cursor, the evaluation results so
far and the RNG states of Python, torch's CPU generator and every CUDA device. DeepSpeed saves the
rest of the state (model, optimizer, learning-rate schedule) partitioned across ranks, in the same
checkpoint (wpn_dist/app/checkpoint.py).
"""
import json
import os
import random
import shutil
import signal
import time
import warnings
from dataclasses import dataclass

import torch

# DeepSpeed still calls the collectives torch 2.13 deprecated, once per step per rank.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                        category=FutureWarning)

from ..core import packed_attention  # noqa: E402
from ..core.methods import build_method  # noqa: E402
from . import distributed, hub, kernels, toy_world  # noqa: E402
from .config import ConfigError, RunConfig, parse_config  # noqa: E402
from .data import BatchMaker, DataCursor, TOY_CONTEXT, TOY_MAX_LENGTH, batch_to_device, encode_examples, examples_from_rows, \
    read_examples, read_normal_jsonl, token_lengths, tokenize_examples  # noqa: E402
from .evaluation import evaluate_model, evaluation_inputs, format_table, memorization_accuracy  # noqa: E402
from .generation import generate  # noqa: E402
from .hooks import Hooks, load_hooks  # noqa: E402
from .tamper import TamperTerm  # noqa: E402
from .preflight import Preflight, check_run, release_lock, take_lock  # noqa: E402

# Exit status of a run that stopped early on a signal after saving a checkpoint: "requeue me".
STOPPED_EXIT_CODE = 99
COLLAPSE_WARNING = 0.25  # share of degenerate answers after unlearning (10 points up) that the log warns about
TOY_LR = 5e-4  # every method but one whose options set their own toy_lr (WPN)
DEFAULT_LR = 1e-5


def resolve_defaults(cfg: RunConfig) -> None:
    """Options whose default depends on the run: the toy world's tiny model wants larger steps, and a
    method's options may have toy-world defaults of their own."""
    is_toy = cfg.model.model == "toy"
    if cfg.train.lr is None:
        cfg.train.lr = getattr(cfg.method_options, "toy_lr", TOY_LR) if is_toy else DEFAULT_LR
    if cfg.data.normal_data is None and cfg.data.data == "toy":
        cfg.data.normal_data = "toy"
    if hasattr(cfg.method_options, "resolve_defaults"):
        notes = cfg.method_options.resolve_defaults(toy_world=is_toy, has_normal_data=cfg.data.normal_data is not None)
        for note in notes or ():
            distributed.print0(note)
    if is_toy and cfg.data.data != "toy":
        raise ConfigError("--model toy (the default) is the toy world's model; with your own --data pass --model too")


@dataclass
class RunInputs:
    """Everything read and validated before a process group is joined or a file written."""
    world: object          # the toy world, or None
    sources: object        # hub.Sources: the local model directory, tokenizer and data the run reads
    tokenizer: object
    examples: list         # data.Example, as read
    encoded: list          # data.EncodedExample, the training set (indices of the data cursor)
    batches: BatchMaker
    evaluation: tuple | None  # (splits, judge, normal rows, extraction rows) when the run evaluates
    notes: str             # what was read, for the log
    preflight: Preflight   # DeepSpeed config, resume target, checkpoint size (app/preflight.py)


def prepare_inputs(cfg: RunConfig, method) -> RunInputs:
    """Fetch (once per node) and read the model's files, the data, the tokenizer and the evaluation
    inputs, and validate them (raises ValueError/OSError with a one-line message)."""
    data = cfg.data
    world = toy_world.make_world(toy_world.ToyWorldConfig(seed=data.toy_seed)) if data.data == "toy" else None
    from . import models
    sources = hub.resolve(cfg.model.model, cfg.model.model_init, cfg.model.tokenizer, data.data, data.data_format)
    if cfg.model.model == "toy":
        tokenizer = toy_world.make_tokenizer(world)
    else:
        tokenizer = models.load_tokenizer(sources.model, sources.tokenizer)
    # --normal_data is read once: training (GA, retain terms) and evaluation (utility) both use it.
    user_normal_rows = read_normal_jsonl(data.normal_data) if data.normal_data not in (None, "toy") else None
    if data.data == "toy":
        examples, fmt, skipped = examples_from_rows(world.unlearning_rows(), "toy world"), "toy", 0
    else:
        examples, fmt, skipped = read_examples(sources.data, data.data_format, data.data_split)
    heldout = []
    if world is None and cfg.eval.evaluate and not cfg.eval.eval_prompts:
        # Your own data, no evaluation prompts: keep a slice out of training to evaluate judge-free.
        count = cfg.eval.eval_holdout
        if count is None:
            count = 0 if len(examples) < 20 else min(64, max(1, round(0.05 * len(examples))))
        if count >= len(examples):
            raise ConfigError(f"--eval_holdout {count} leaves no training rows ({len(examples)} rows)")
        examples, heldout = examples[:len(examples) - count], examples[len(examples) - count:]
    tokenized, lengths = tokenize_examples(examples, tokenizer, data.prompt_format), None
    if world is None:  # your own data: its length distribution, and --max_length from it by default
        lengths = token_lengths(tokenized)
        if data.max_length is None:
            data.max_length = lengths.default_max_length(models.context_length(sources.model))
    elif data.max_length is None:  # the toy world: its own model has TOY_CONTEXT positions, others more
        data.max_length = TOY_CONTEXT if cfg.model.model == "toy" else TOY_MAX_LENGTH
    encoded, dropped, truncated = encode_examples(examples, tokenizer, data.prompt_format, data.max_length,
                                                  data.overlong, source=data.data, tokenized=tokenized)
    notes = f"{len(encoded)} examples from {data.data} ({fmt})"
    if lengths is not None:
        notes += "; " + lengths.describe(data.max_length)
    if heldout:
        notes += f"; {len(heldout)} held out for evaluation"
    if skipped or dropped or (truncated and lengths is None):  # the length report counts truncations itself
        notes += f"; {skipped} prompts skipped (no safe or no unsafe response), {dropped} dropped as overlong"
        notes += f", {truncated} responses truncated to --max_length {data.max_length}" if lengths is None else ""
    normal_rows = None
    if {"normal", "random"} & set(method.row_groups()):
        if data.normal_data is None:
            raise ConfigError(f"--method {cfg.method.method} with these options needs --normal_data "
                              f"(a JSONL file of {{prompt, response}} rows)")
        normal_rows = world.normal_rows() if data.normal_data == "toy" else user_normal_rows
        notes += f"; {len(normal_rows)} normal rows from {data.normal_data}"
    batches = BatchMaker(encoded, examples, tokenizer, data.prompt_format, data.max_length, method.row_groups(),
                         normal_rows, cfg.train.seed, layout=cfg.train.batch_layout, **method.batch_options())
    evaluation = None
    if cfg.eval.evaluate and (world is not None or cfg.eval.eval_prompts or heldout):
        evaluation = evaluation_inputs(world, cfg.eval.eval_prompts, user_normal_rows, cfg.eval.judge,
                                       cfg.eval.judge_harmless_labels, heldout)
    elif cfg.eval.evaluate:
        notes += "; not evaluated (fewer than 20 rows: give --eval_prompts or --eval_holdout)"
    return RunInputs(world, sources, tokenizer, examples, encoded, batches, evaluation, notes, check_run(cfg, sources.model))


class StopSignal:
    """Remembers SIGUSR1/SIGTERM (Slurm's warning before a time limit, preemption) so that the loop can
    checkpoint at the next step boundary and exit with STOPPED_EXIT_CODE, for the job to requeue."""

    def __init__(self):
        self.received, self.received_at, self.terminate = False, None, False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if not self.received:
            self.received, self.received_at = True, time.time()
        self.terminate = self.terminate or signum == signal.SIGTERM

    def seconds_left(self) -> float | None:
        """Seconds this process has left after the signal (collective), or None when it need not hurry.
        After SIGTERM, Slurm sends SIGKILL KillWait seconds later (``WPN_DIST_KILL_WAIT_S``, default
        30); after SIGUSR1 the job has the margin of ``--signal=USR1@T`` (``WPN_DIST_SIGNAL_MARGIN_S``,
        set by the templates; unset: no deadline)."""
        elapsed = distributed.all_reduce_max_float(time.time() - self.received_at if self.received else 0.0)
        terminate = bool(distributed.all_reduce_max(int(self.terminate)))
        grace = os.environ.get("WPN_DIST_KILL_WAIT_S", "30") if terminate else os.environ.get("WPN_DIST_SIGNAL_MARGIN_S")
        return None if grace in (None, "") else float(grace) - elapsed


def rng_states() -> dict:
    states = {"python": random.getstate(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()  # every device this process sees
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])


class Trainer:
    """One run: built in the order of ``__init__``, trained by ``fit``. It is also the ``TrainingRun``
    the methods' hooks see (wpn_dist/core/methods/base.py)."""

    def __init__(self, cfg: RunConfig, method, inputs: RunInputs, stop_signal: StopSignal, hooks: Hooks):
        self.cfg, self.method, self.inputs, self.stop_signal, self.hooks = cfg, method, inputs, stop_signal, hooks
        self.tokenizer = inputs.tokenizer
        # 1. Process group; the run directory's lock; an old run moved aside (--overwrite_output_dir);
        #    the resolved config. Every check that needs no process group has passed (preflight).
        distributed.init()
        if cfg.train.output_dir is None:  # <output root>/<method>-<model>-<time>, rank 0's clock (collective)
            from .preflight import output_root
            stamp = distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
            cfg.train.output_dir = os.path.join(
                output_root(), f"{cfg.method.method}-{os.path.basename(cfg.model.model.rstrip('/'))}-{stamp}")
        self.run_dir = cfg.train.output_dir
        resume_from = inputs.preflight.resume_from
        self.moved_aside = self._claim_run_dir(fresh=resume_from is None)
        distributed.print0(f"wpn_dist: run directory {self.run_dir}; world size {distributed.world_size()}; "
                           f"{inputs.notes}")
        # 2. Model and engine, and the reference and tamper term the method may need (the toy world's
        #    base model is implanted once, on rank 0, and cached).
        self.engine, self.reference, self.tamper = self._build_engines()
        if self.moved_aside and distributed.is_main():  # the new run has started: the old one can go
            shutil.rmtree(self.moved_aside, ignore_errors=True)
        # 3. Where the loop stands: step, data cursor, evaluation results.
        self.step = self.first_step = 1
        self.cursor = DataCursor(range(len(inputs.encoded)), cfg.train.micro_batch_size, distributed.world_size(),
                                 cfg.train.gradient_accumulation_steps, cfg.train.seed)
        self.results, self.last_saved, self.last_save_seconds = {}, None, None
        # 4. Resume from the checkpoint preflight found complete and of this world size, if any.
        if resume_from is not None:
            from . import checkpoint
            self.load_state_dict(checkpoint.load(self.engine, resume_from))
            self.last_saved = resume_from
            distributed.print0(f"wpn_dist: resumed from {resume_from} at step {self.first_step - 1}")
        self.resumed = resume_from is not None

    def _claim_run_dir(self, fresh: bool) -> str | None:
        """Rank 0 takes the run directory's lock, moves an old run aside when asked to overwrite it
        (it is removed once the new run has started), and writes config.json for a fresh run (a resumed
        run keeps the config it started with). Collective. Returns the moved-aside path, or None."""
        problem, aside = None, None
        if distributed.is_main():
            from .preflight import describe, lock_holder
            holder = lock_holder(self.run_dir)
            if holder is not None:
                problem = f"--output_dir {self.run_dir} is in use by another run ({describe(holder)})"
            elif self.cfg.train.overwrite_output_dir and os.path.isdir(self.run_dir) and os.listdir(self.run_dir):
                aside = f"{self.run_dir.rstrip('/')}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                os.replace(self.run_dir, aside)
                print(f"wpn_dist: the old run in {self.run_dir} is moved to {aside} until this one starts", flush=True)
            problem = problem or take_lock(self.run_dir)
            if problem is None and fresh:
                with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                    json.dump(self.cfg.to_dict(), f, indent=2)
        problem = distributed.broadcast_object(problem)
        if problem:
            distributed.fail(problem)
        return aside

    def _build_engines(self) -> tuple:
        """The DeepSpeed engine of the model being unlearned; if the method needs them, the frozen
        original as a second engine and the tamper term (else None). Under ZeRO-3 an HfDeepSpeedConfig
        must exist while from_pretrained runs, so that weights are partitioned as they load instead of
        materialising on every rank."""
        from . import engine as engine_lib, models
        cfg = self.cfg
        model_name = self.inputs.sources.model
        if model_name == "toy":
            implant_cfg = toy_world.ImplantConfig()
            model_name = toy_world.implant_dir(self.inputs.world.config, implant_cfg)
            if distributed.is_main() and not os.path.isdir(model_name):
                distributed.print0(f"wpn_dist: implanting the toy model (once; cached in {model_name})")
                toy_world.implant(self.inputs.world, implant_cfg, model_name, log=distributed.print0)
            distributed.barrier()
        ds_config = self.inputs.preflight.ds_config  # built and checked before anything started
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32

        def load():
            return models.load_model(model_name, self.tokenizer, cfg.model.model_init, dtype, cfg.train.seed)
        # The tamper term's attacked copy is a whole model on every rank: loaded before ZeRO-3's
        # partitioning is switched on (its weights are the engine's, copied in every step).
        adversary = load() if self.method.tamper_settings() is not None else None
        self._hf_ds_config = None
        if engine_lib.zero_stage(ds_config) == 3 and cfg.model.model_init == "pretrained":
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds_config = HfDeepSpeedConfig(ds_config)  # kept alive on purpose
        model = load()
        if cfg.train.activation_checkpointing:
            # Non-reentrant: works with one packed forward per step and ZeRO-3's gradient hooks.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        reference = load() if self.method.needs_reference() else None
        if cfg.train.batch_layout == "packed":
            supported = packed_attention.install(model) and (reference is None or packed_attention.install(reference))
            if not supported:
                distributed.print0(f"wpn_dist: packed batches are not supported for {type(model).__name__}; "
                                   f"using --batch_layout padded")
                self.inputs.batches.layout = "padded"
        engine, _, _ = engine_lib.initialize(model, ds_config)
        reference = engine_lib.initialize_reference(reference, ds_config) if reference is not None else None
        tamper = None
        if adversary is not None:
            adversary.config.use_cache = False
            by_id = self.inputs.batches.examples
            # An example without a group is a group of its own.
            groups = [by_id[e.example_id].group or f"\0{e.example_id}" for e in self.inputs.encoded]
            tamper = TamperTerm(adversary.to(engine.device), self.method.tamper_settings(), self.inputs.encoded,
                                groups, self.tokenizer.pad_token_id, cfg.train.seed, self.inputs.batches.disturbed)
            gib = sum(p.numel() * p.element_size() for p in adversary.parameters()) / 2 ** 30
            distributed.print0(f"wpn_dist: the tamper term attacks a whole copy of the model on every rank: "
                               f"{gib:.3g} GiB of weights, about 4x that with its gradients and AdamW state")
        return engine, reference, tamper

    # --- the state a checkpoint holds beside DeepSpeed's ------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "results": self.results, "cursor": self.cursor.state(), "rng": rng_states()}

    def load_state_dict(self, state: dict) -> None:
        c = state["cursor"]
        self.cursor = DataCursor(c["subset"], self.cfg.train.micro_batch_size, distributed.world_size(),
                                 self.cfg.train.gradient_accumulation_steps, self.cfg.train.seed, c["epoch"], c["index"])
        self.step = self.first_step = state["step"] + 1
        self.results = state["results"]
        set_rng_states(state["rng"])

    # --- what the methods' hooks see (core.methods.base.TrainingRun) -------------------------

    @property
    def epoch(self) -> int:
        return self.cursor.epoch

    def examples(self) -> list:
        by_id = self.inputs.batches.examples
        return [by_id[e.example_id] for e in self.inputs.encoded]

    @property
    def total_steps(self) -> int:
        return self.cfg.train.steps

    def generate(self, prompts: list, prefills: list | None = None) -> list:
        texts = generate(self.engine.module, self.tokenizer, prompts, self.cfg.data.prompt_format,
                         self.cfg.eval.max_new_tokens, self.cfg.eval.eval_batch_size, prefills=prefills)
        # Forward passes without backward leave ZeRO-3's gathered parameters in place: release them.
        self.engine.empty_partition_cache()
        return texts

    def memorization_accuracy(self, rows: list) -> float:
        accuracy = memorization_accuracy(self.engine.module, self.tokenizer, rows, self.cfg.data.prompt_format,
                                         self.cfg.data.max_length, self.cfg.eval.eval_batch_size)
        self.engine.empty_partition_cache()
        return accuracy

    def set_epoch_subset(self, indices: list) -> None:
        self.cursor.restrict(indices)

    def set_anchors(self, continuations: dict) -> None:
        self.inputs.batches.set_anchors(continuations)

    def log(self, message: str) -> None:
        distributed.print0(message)

    # --- evaluation, one step, the loop --------------------------------------------------------

    def evaluate(self, only_first_split: bool = False) -> dict:
        splits, judge, normal_rows, extraction, harmless = self.inputs.evaluation
        if only_first_split and self.inputs.world is not None:  # the toy world's first split is enough
            splits, normal_rows, extraction, harmless = dict([next(iter(splits.items()))]), [], None, None
        result = evaluate_model(self.engine.module, self.tokenizer, splits, judge, normal_rows,
                                self.cfg.data.prompt_format, self.cfg.eval.max_new_tokens,
                                self.cfg.eval.eval_batch_size, self.cfg.data.max_length, extraction_rows=extraction,
                                harmless_rows=harmless)
        self.engine.empty_partition_cache()  # see generate()
        return result

    def train_step(self) -> tuple:
        """One optimizer step over the cursor's next step plan: for each micro-batch one packed forward,
        the method's loss, backward and the engine's step. Returns (each term's mean over the
        micro-batches, as detached tensors; tokens counted)."""
        plan = self.cursor.next_step()
        rank, num_micro = distributed.rank(), self.cfg.train.gradient_accumulation_steps
        sums, tokens = {}, 0
        batches = self.inputs.batches.step_batches(plan, self.step, rank)
        finite = torch.ones((), dtype=torch.bool, device=self.engine.device)
        for micro, batch in enumerate(batches):
            tokens += batch.pop("num_tokens")
            batch = batch_to_device(batch, self.engine.device)
            terms = self.method.loss_terms(self.engine, batch, self.reference)
            loss = self.hooks.loss(self.step, terms["loss/total"])
            finite &= torch.isfinite(loss.detach())  # a device op: no host sync per micro-step
            with packed_attention.active(batch["layout"]):  # activation checkpointing recomputes with it
                self.engine.backward(loss)
            if micro == len(batches) - 1:
                # Once per optimizer step, collective: all ranks stop together, before the last
                # engine.step() of the window applies the (non-finite) gradients to the weights.
                if distributed.all_reduce_max(int(not finite)):
                    distributed.fail(f"non-finite loss at step {self.step}; the last good checkpoint is "
                                     f"{self.last_saved or 'none (no checkpoint was saved)'}, left as it was", code=3)
                if self.tamper is not None:  # its gradient joins the window's, before the engine's step
                    sums.update(self.tamper.apply(self.engine, self.step))
            self.engine.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach() / num_micro
        return sums, tokens

    def save(self, step: int) -> None:
        from . import checkpoint
        started = time.time()
        self.last_saved = checkpoint.save(self.engine, self.run_dir, step, self.state_dict(),
                                          keep=self.cfg.train.keep_checkpoints, hooks=self.hooks)
        self.last_save_seconds = distributed.all_reduce_max_float(time.time() - started)

    def save_fits_before_kill(self) -> tuple:
        """After a stop signal: whether a checkpoint can be written before the process is killed, the
        estimated save time (the last save's, else the checkpoint's size over the disk's measured write
        speed) and the seconds left (collective)."""
        left = self.stop_signal.seconds_left()
        estimate = self.last_save_seconds
        if estimate is None:
            from .checkpoint import measure_write_speed
            speed = measure_write_speed(self.run_dir) if distributed.is_main() else 0.0
            estimate = self.inputs.preflight.checkpoint_bytes / max(distributed.broadcast_object(speed), 1.0)
        return left is None or estimate < 0.8 * left, estimate, left

    def fit(self) -> dict:
        """Evaluate before (a fresh run), train to --steps with logging, evaluation and checkpoints,
        then evaluate after, export and write summary.json. Collective."""
        from .metrics import RunLogger, memory_gib
        cfg, evaluates = self.cfg, cfg_evaluates(self.cfg, self.inputs)
        if self.resumed and self.first_step > cfg.train.steps:
            return self.finish_trained()
        if not self.resumed:
            if evaluates and cfg.eval.evaluate_before:
                self.results["before"] = self.evaluate()
            self.method.on_epoch_start(self)
        logger = RunLogger(self.run_dir, cfg.train.steps, distributed.is_main())
        logger.advance(self.first_step - 1)
        if "before" in self.results and not self.resumed:
            logger.log(0, eval_scalars(self.results["before"]))
        # Throughput windows count only the steps' own time: evaluation and checkpoints are excluded.
        window_seconds, window_tokens, total_tokens, last_loss = 0.0, 0, 0, float("nan")
        started, last_step = time.time(), self.first_step - 1
        self.engine.train()
        for step in range(self.first_step, cfg.train.steps + 1):
            self.step = step
            if self.cursor.subset and self.cursor.epoch_done():  # epochs end on step boundaries (ShardedSampler)
                self.cursor.start_epoch()
                self.method.on_epoch_start(self)
            if not self.cursor.subset:
                distributed.print0(f"wpn_dist: every example has left the training set ({cfg.method.method}); "
                                   f"stopping before step {step}")
                break
            self.method.on_step_start(self)
            step_started = time.time()
            terms, tokens = self.train_step()
            window_seconds += time.time() - step_started
            window_tokens += tokens
            last_step = step
            logger.advance()
            steps_in_window = (step - 1) % cfg.train.log_every + 1
            if steps_in_window == cfg.train.log_every or step == cfg.train.steps:
                # Collectives: every rank reaches this at the same steps.
                row = {name: distributed.all_reduce_mean(float(value)) for name, value in terms.items()}
                tokens_all = distributed.all_reduce_sum(window_tokens)
                seconds = distributed.all_reduce_max_float(window_seconds)
                row.update({"lr": self.engine.get_lr()[0], "step_time(s)": seconds / steps_in_window,
                            "throughput(tokens/s)": tokens_all / max(seconds, 1e-9), **memory_gib(),
                            **self.method.log_values()})
                last_loss = row["loss/total"]
                logger.log(step, row)
                total_tokens += tokens_all
                window_seconds, window_tokens = 0.0, 0
            if evaluates and cfg.eval.eval_every and step % cfg.eval.eval_every == 0:
                logger.log(step, eval_scalars(self.evaluate(only_first_split=True)))
            self.hooks.after_step(step)
            # Collective, every step: a stop signal on any rank stops all ranks at this step boundary.
            stop_requested = bool(distributed.all_reduce_max(int(self.stop_signal.received)))
            if stop_requested and step < cfg.train.steps:
                fits, estimate, left = self.save_fits_before_kill()
                if fits:
                    self.save(step)
                    said = f"checkpoint {self.last_saved} saved at step {step}"
                else:  # a save cut off by SIGKILL would leave nothing newer, and cost the time it took
                    said = (f"a checkpoint would take about {estimate:.0f}s and {left:.0f}s are left: not saving; "
                            f"the run continues from {self.last_saved or 'the start (no checkpoint yet)'}")
                self.stop(logger, said)
            if step == cfg.train.steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
                self.save(step)
        if self.first_step <= last_step < cfg.train.steps:  # stopped early (ICU): save where it stopped
            self.step = last_step
            self.save(last_step)
        wall_seconds = time.time() - started
        if evaluates:
            self.results["after"] = self.evaluate()
            logger.log(last_step, eval_scalars(self.results["after"]))
            before = self.results.get("before", {}).get("degenerate_rate", {})
            for split, rate in self.results["after"].get("degenerate_rate", {}).items():
                was = before.get(split, {}).get("rate", 0.0)
                if "/" not in split and rate["rate"] >= COLLAPSE_WARNING and rate["rate"] - was >= 0.1:
                    logger.write(f"wpn_dist: warning: {100 * rate['rate']:.0f}% of the answers on split {split} are "
                                 f"degenerate (neither harmful nor a well-formed answer) after unlearning, "
                                 f"{100 * was:.0f}% before: check the model for collapse")
        logger.close()
        return self.finish(last_step, wall_seconds, total_tokens, last_loss)

    def finish_trained(self) -> dict:
        """A resumed run with no step left to train (``python -m wpn_dist.export``, or --steps reached):
        evaluate if asked and export; the run's record (summary.json, metrics, tensorboard) stays as the
        run that trained wrote it."""
        distributed.print0(f"wpn_dist: the checkpoint is at step {self.first_step - 1} of --steps {self.cfg.train.steps}: "
                           f"nothing to train")
        if cfg_evaluates(self.cfg, self.inputs):
            self.results["after"] = self.evaluate()
            if distributed.is_main():
                print(format_table(self.results), flush=True)
        self.export()
        if distributed.is_main():
            release_lock(self.run_dir)
        return {"steps_run": 0, "checkpoint": self.last_saved, "evaluation": self.results or None}

    def export(self) -> None:
        if self.cfg.train.export_hf:
            from .export import export_hf
            export_hf(self.engine, self.tokenizer, self.cfg.train.export_dir or os.path.join(self.run_dir, "hf"),
                      dtype=self.cfg.train.export_dtype, max_shard_size=self.cfg.train.export_max_shard_size)

    def stop(self, logger, said: str) -> None:
        """Leave after a stop signal with STOPPED_EXIT_CODE, for the job to requeue and resume."""
        logger.close()
        distributed.print0(f"wpn_dist: stop signal: {said}; exiting with status {STOPPED_EXIT_CODE} "
                           f"(continue with --resume auto)")
        if distributed.is_main():
            release_lock(self.run_dir)
        distributed.shutdown()  # so that the exit status stays 99 (see shutdown and exit_now)
        distributed.exit_now(STOPPED_EXIT_CODE)

    def finish(self, last_step: int, wall_seconds: float, total_tokens: int, last_loss: float) -> dict:
        cfg = self.cfg
        self.export()
        summary = {"method": cfg.method.method, "model": cfg.model.model, "world_size": distributed.world_size(),
                   "steps": cfg.train.steps, "steps_run": last_step, "first_step": self.first_step,
                   "tokens": int(total_tokens), "wall_seconds": round(wall_seconds, 2), "final_loss": last_loss,
                   "checkpoint": self.last_saved, "evaluation": self.results or None}
        if distributed.is_main():
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            if "after" in self.results:
                print(format_table(self.results), flush=True)
            print(f"wpn_dist: done in {wall_seconds:.0f}s; summary in {os.path.join(self.run_dir, 'summary.json')}",
                  flush=True)
            release_lock(self.run_dir)
        return summary


def eval_scalars(result: dict) -> dict:
    """An evaluation's numbers for the log: the first split's harmless and degenerate rates, and the
    likelihood and utility measures it has."""
    out = {}
    for key in ("harmless_rate", "degenerate_rate"):
        if result.get(key):
            out[f"eval/{key}"] = next(iter(result[key].values()))["rate"]
    for key in ("extraction_loglik", "harmless_loglik", "perplexity"):
        if key in result:
            out[f"eval/{key}"] = result[key]
    if "qa_accuracy" in result:
        out["eval/qa_accuracy"] = result["qa_accuracy"]["rate"]
    return out


def cfg_evaluates(cfg: RunConfig, inputs: RunInputs) -> bool:
    return cfg.eval.evaluate and inputs.evaluation is not None


def main(argv=None) -> dict:
    # A launch whose ranks disagree with what the launcher was asked for is refused before anything
    # else (accelerate launch can start one process where two were asked for).
    distributed.check_launch()
    # From the start: a stop signal while the model loads still ends in a checkpoint and a requeue.
    stop_signal = StopSignal()
    hub.default_extensions_dir()  # the DeepSpeed ops `python -m wpn_dist.prepare` built, if any
    # Options, model name and data are validated before anything is started or written.
    try:
        cfg = parse_config(argv)
        if argv is None and cfg.model.model == "toy":  # the command line: the toy world's numbers need fixed kernels
            kernels.pin_toy_kernels(distributed.print0)
        distributed.default_threads()  # before tokenising or building the model; OMP_NUM_THREADS wins
        resolve_defaults(cfg)
        method = build_method(cfg.method.method, cfg.method_options)
        inputs = prepare_inputs(cfg, method)
        hooks = load_hooks()
    except (ValueError, OSError) as e:  # ConfigError, DataError and bad judge options
        distributed.fail(str(e))
    summary = Trainer(cfg, method, inputs, stop_signal, hooks).fit()
    distributed.shutdown()
    return summary
