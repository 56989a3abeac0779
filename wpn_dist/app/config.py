"""Every option of a training run, as dataclasses (wpn_dist.app.options parses them).

The run's options are the groups below plus each registered method's own ``Options``
(wpn_dist/core/methods/). The resolved config is saved as ``config.json`` in the run directory.
"""
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Optional

from ..core.methods import method_class, method_names
from .data import PROMPT_FORMAT
from .models import check_model_name
from .options import OptionError, parse_options

ConfigError = OptionError  # a bad option of a run: the message names it


@dataclass
class ModelArguments:
    model: str = field(default="toy", metadata={"help": "A name from wpn_dist.models.MODEL_SPECS (e.g. opt-1.3b), a "
                       "local Hugging Face model directory, a hub id (org/name: fetched into the Hugging Face cache once "
                       "per node, or read from it with HF_HUB_OFFLINE=1), or 'toy' for the toy world's implanted model."})
    model_init: Literal["pretrained", "random"] = field(default="pretrained", metadata={
        "help": "Load pretrained weights, or build the named architecture with random weights."})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "Tokenizer directory or hub name (default: the model's)."})

    def __post_init__(self):
        if self.model != "toy":
            try:
                check_model_name(self.model)
            except ValueError as e:
                raise ConfigError(str(e)) from None


@dataclass
class DataArguments:
    data: str = field(default="toy", metadata={"help": "'toy', a JSONL file of {prompt, harmless, harmful: [..]} rows, "
                      "or PKU-SafeRLHF data (a local file in its schema or, with --data_format pku, a hub name)."})
    data_format: Literal["auto", "toy", "jsonl", "pku"] = field(default="auto", metadata={
        "help": "How to read --data; 'auto' tells JSONL from PKU-SafeRLHF by the first row."})
    data_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    prompt_format: str = field(default=PROMPT_FORMAT, metadata={
        "help": "Template around each prompt; the response follows after a space."})
    max_length: Optional[int] = field(default=None, metadata={
        "help": "Maximum tokens of prompt + response. Default: the data's 99th percentile of pair lengths rounded "
                "up to a multiple of 64, within the model's context (the log prints the length distribution and "
                "how many responses are truncated); 256 for the toy world."})
    overlong: Literal["error", "drop"] = field(default="error", metadata={
        "help": "A prompt with no room for a response within max_length: stop with an error, or drop the row "
                "(counted in the log). Responses that do not fit are truncated (also counted)."})
    toy_seed: int = field(default=0, metadata={"help": "Seed of the toy world."})
    normal_data: Optional[str] = field(default=None, metadata={
        "help": "Normal (retain) data, a JSONL file of {prompt, response} rows: GA's random answers and KL term, "
                "WPN's --retain_weight. Default with --data toy: the toy world's QA facts."})

    def __post_init__(self):
        if "{prompt}" not in self.prompt_format:
            raise ConfigError("--prompt_format must contain '{prompt}'")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max_length must be at least 2, got {self.max_length}")
        if self.data_format == "toy" and self.data != "toy":
            raise ConfigError("--data_format toy needs --data toy")
        if self.normal_data is not None and self.normal_data != "toy" and not os.path.isfile(self.normal_data):
            raise ConfigError(f"--normal_data {self.normal_data}: no such file")


@dataclass
class MethodArguments:
    method: str = field(default="wpn", metadata={
        "choices": list(method_names()),
        "help": "Objective: wpn (N-pair), ga (gradient ascent, Yao et al.), icu (Tang et al.), lm (a plain "
                "causal-LM step over the same tokens: the speed reference of the scaling study; unlearns "
                "nothing), or any other registered method (wpn_dist/core/methods/). Each method's own "
                "options are listed below, prefixed with its name."})


@dataclass
class TrainArguments:
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "Run directory (default: <root>/<method>-<model>-<time>, where <root> is $OUTPUT_ROOT, else "
                "$SCRATCH/wpn_dist, else runs/). An existing non-empty one is an error unless --overwrite_output_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing run directory."})
    steps: int = field(default=120, metadata={"help": "Optimizer steps."})
    micro_batch_size: int = field(default=8, metadata={"help": "Examples per rank per forward pass."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr: Optional[float] = field(default=None, metadata={
        "help": "Peak learning rate (default 1e-5; on the toy world 3.5e-4 for WPN, 5e-4 for the other methods)."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warm-up steps, then linear decay to 0."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 = off)."})
    ds_config: str = field(default="zero3", metadata={
        "help": "DeepSpeed config: a name from ds_configs/ (zero2, zero3, zero3_offload) or a JSON path."})
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": "Training precision."})
    activation_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    batch_layout: Literal["packed", "padded"] = field(default="packed", metadata={
        "help": "packed: one row of each micro-batch's distinct tokens, every prompt encoded once and no padding "
                "(exact: the same loss and gradients as padded); padded: one padded row per sequence (the old "
                "layout, for comparison; also the fallback for architectures packed attention does not know)."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and initialisation."})
    log_every: int = field(default=10, metadata={"help": "Steps between log rows."})
    save_every: int = field(default=0, metadata={"help": "Steps between checkpoints (0: only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Newest complete checkpoints kept (0: all)."})
    resume: str = field(default="never", metadata={
        "help": "'auto': continue from the newest complete checkpoint in --output_dir if there is one; "
                "a checkpoint directory: continue from it; 'never': start afresh."})
    export_hf: bool = field(default=True, metadata={
        "help": "At the end, write the model in Hugging Face format (safetensors shards with an index, written "
                "shard by shard from the ZeRO-3 partitions) to --export_dir."})
    export_dir: Optional[str] = field(default=None, metadata={"help": "Where the export goes (default: <output_dir>/hf)."})
    export_dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(default="auto", metadata={
        "help": "dtype of the exported weights; auto: the training dtype (--precision)."})
    export_max_shard_size: str = field(default="5GB", metadata={
        "help": "Largest safetensors file of the export (e.g. 5GB, 500MB, or bytes)."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher; ignore."})

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.resume not in ("never", "auto") and not os.path.isdir(self.resume):
            raise ConfigError(f"--resume must be 'never', 'auto' or a checkpoint directory; {self.resume!r} is none")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")


@dataclass
class EvalArguments:
    evaluate: bool = field(default=True, metadata={"help": "Evaluate before and after unlearning."})
    evaluate_before: bool = field(default=True, metadata={"help": "With --evaluate: also evaluate before unlearning."})
    eval_every: int = field(default=0, metadata={
        "help": "Steps between evaluations on the first split during training (0: none). Logged as eval/..."})
    eval_prompts: Optional[str] = field(default=None, metadata={
        "help": "Harmful prompts to evaluate on, a JSONL file of {prompt, split, harmful} rows (split and harmful "
                "optional, e.g. split id, ood, adversarial/role_play). Default with --data toy: the toy world's "
                "splits; with your own data: a held-out slice of it (--eval_holdout)."})
    eval_holdout: Optional[int] = field(default=None, metadata={
        "help": "With your own --data and no --eval_prompts: rows kept out of training and evaluated before, "
                "during and after (likelihood of their harmful and harmless responses, degeneracy of the "
                "greedy answers, and the harmless rate with a classifier --judge). Default: 5%% of the rows, "
                "at most 64, none under 20 rows; 0: none."})
    judge: str = field(default="rule", metadata={
        "help": "Harmfulness judge: 'rule' (toy world) or a local Hugging Face sequence-classification model dir. "
                "Without a classifier, your own data is evaluated by judge-free measures only."})
    judge_harmless_labels: Optional[str] = field(default=None, metadata={
        "help": "With a classifier --judge: comma-separated label names (or ids) that mean harmless."})
    max_new_tokens: int = field(default=24, metadata={"help": "Tokens generated per evaluation prompt."})
    eval_batch_size: int = field(default=32, metadata={"help": "Prompts per generation batch per rank."})


def export_dtype_name(train: "TrainArguments") -> str:
    """The dtype an export is written in: --export_dtype, or the training dtype for auto."""
    return train.precision if train.export_dtype == "auto" else train.export_dtype


ARGUMENT_CLASSES = (ModelArguments, DataArguments, MethodArguments, TrainArguments, EvalArguments)


def method_option_classes() -> dict:
    """method name -> the dataclass of its own options."""
    return {name: method_class(name).Options for name in method_names()}


@dataclass
class RunConfig:
    model: ModelArguments
    data: DataArguments
    method: MethodArguments
    train: TrainArguments
    eval: EvalArguments
    method_options: object = None  # the chosen method's Options instance

    def to_dict(self) -> dict:
        out = {name: asdict(getattr(self, name)) for name in ("model", "data", "method", "train", "eval")}
        out["method"].update(asdict(self.method_options))
        return out


def parse_config(argv: list | None = None, extra_classes: tuple = (), prog: str = "wpn_dist/train.py",
                 description: str = "Unlearn a causal LM with WPN or a baseline under DeepSpeed."):
    """Parse defaults < --config file < command line into a validated RunConfig. Options of a method
    other than the chosen one are an error when given. With ``extra_classes`` (a command's own options
    beside a run's, e.g. prepare's) returns (RunConfig, their instances)."""
    per_method = method_option_classes()
    # One dataclass per distinct Options class (methods without options share NoOptions).
    option_classes = list(dict.fromkeys(per_method.values()))
    try:
        parsed, given = parse_options(tuple(extra_classes) + ARGUMENT_CLASSES + tuple(option_classes), argv,
                                      prog=prog, description=description)
    except OptionError as e:
        raise ConfigError(str(e)) from None
    extras, parsed = parsed[:len(extra_classes)], parsed[len(extra_classes):]
    run_parts, method_parts = parsed[:len(ARGUMENT_CLASSES)], dict(zip(option_classes, parsed[len(ARGUMENT_CLASSES):]))
    chosen = run_parts[2].method
    for name, cls in per_method.items():
        if cls is per_method[chosen]:
            continue
        stray = sorted(given & {f.name for f in fields(cls)})
        if stray:
            raise ConfigError(f"--{stray[0]} is an option of --method {name}, not of --method {chosen}")
    cfg = RunConfig(*run_parts, method_options=method_parts[per_method[chosen]])
    return (cfg, extras) if extra_classes else cfg
