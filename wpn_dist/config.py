"""Every option of a run, as dataclasses parsed by transformers' HfArgumentParser.

Precedence: field defaults < the ``--config`` file (YAML or JSON) < command-line options. Unknown
options, in the file or on the command line, are errors; so are values of the wrong type. The resolved
config is saved as ``config.json`` in the run directory.
"""
import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Optional

from transformers import HfArgumentParser

from .models import check_model_name


class ConfigError(ValueError):
    """A bad option: the message names it."""


@dataclass
class ModelArguments:
    model: str = field(default="toy", metadata={"help": "A name from wpn_dist.models.MODEL_SPECS (e.g. opt-1.3b), a "
                       "local Hugging Face model directory, or 'toy' for the toy world's implanted model."})
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
    prompt_format: str = field(default="### Question: {prompt} ### Answer:", metadata={
        "help": "Template around each prompt; the response follows after a space."})
    max_length: int = field(default=256, metadata={"help": "Maximum tokens of prompt + response."})
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
        if self.max_length < 2:
            raise ConfigError(f"--max_length must be at least 2, got {self.max_length}")
        if self.data_format == "toy" and self.data != "toy":
            raise ConfigError("--data_format toy needs --data toy")
        if self.normal_data is not None and self.normal_data != "toy" and not os.path.isfile(self.normal_data):
            raise ConfigError(f"--normal_data {self.normal_data}: no such file")


@dataclass
class MethodArguments:
    method: Literal["wpn", "ga", "icu", "lm"] = field(default="wpn", metadata={
        "help": "Objective: wpn (N-pair), ga (gradient ascent, Yao et al.), icu (Tang et al.), or lm (a plain "
                "causal-LM step over the same tokens: the speed reference of the scaling study; unlearns nothing)."})
    # --- WPN
    pooling: Literal["weighted", "mean", "last"] = field(default="weighted", metadata={
        "help": "How hidden states are pooled over a span (position-weighted mean by default)."})
    anchor: Literal["prompt", "generation"] = field(default="prompt", metadata={
        "help": "Span the anchor is pooled over: the prompt tokens (read from the positive sequence's forward), or "
                "the response tokens of the model's own greedy continuation of the prompt (our choices)."})
    anchor_refresh_steps: int = field(default=10, metadata={
        "help": "With --anchor generation: steps between regenerating the continuations."})
    similarity: Literal["cosine", "dot"] = field(default="cosine", metadata={"help": "Similarity in the N-pair loss."})
    temperature: float = field(default=0.1, metadata={"help": "Temperature tau of the N-pair loss."})
    global_negatives: bool = field(default=True, metadata={
        "help": "Use the harmful responses of every example on every rank as negatives (gathered)."})
    positive_lm_weight: Optional[float] = field(default=None, metadata={
        "help": "Weight of the token cross-entropy of the harmless response given the prompt, added to the N-pair "
                "loss (our choice, not the paper's). Default: 0 for real models, 1 for the toy world."})
    retain_weight: Optional[float] = field(default=None, metadata={
        "help": "Weight of a retain term on normal data (--normal_data), added to the N-pair loss (our choice). "
                "Default: 0 for real models, 1 for the toy world."})
    retain_loss: Literal["ce", "kl"] = field(default="ce", metadata={
        "help": "Retain term: cross-entropy of the normal responses, or KL from the frozen original model."})
    # --- GA (Yao et al. 2023)
    ga_weight: float = field(default=0.5, metadata={"help": "GA: weight of the negated cross-entropy of harmful responses."})
    ga_random_weight: float = field(default=1.0, metadata={
        "help": "GA: weight of the cross-entropy of random normal responses given the harmful prompt."})
    ga_kl_weight: float = field(default=1.0, metadata={
        "help": "GA: weight of KL(original || model) on normal data (the original is a second, frozen engine)."})
    # --- ICU (Tang et al. 2024)
    icu_forget_weight: float = field(default=1.0, metadata={"help": "ICU: weight of the negated CE of the forget sample."})
    icu_analogous_weight: float = field(default=0.5, metadata={"help": "ICU: weight of the CE of the analogous sample."})
    icu_kl_weight: float = field(default=1.0, metadata={
        "help": "ICU: weight of KL(original || model) on the analogous sample."})
    icu_bleu_threshold: float = field(default=0.01, metadata={
        "help": "ICU refinement: a forget sample whose continuation scores BLEU below this against its harmful "
                "responses counts as unlearned and leaves the next epoch."})

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.anchor_refresh_steps < 1:
            raise ConfigError(f"--anchor_refresh_steps must be at least 1, got {self.anchor_refresh_steps}")
        for name in ("positive_lm_weight", "retain_weight", "ga_weight", "ga_random_weight", "ga_kl_weight",
                     "icu_forget_weight", "icu_analogous_weight", "icu_kl_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name} must be >= 0, got {value}")


@dataclass
class TrainArguments:
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "Run directory (default: runs/<method>-<model>-<time>). An existing non-empty one is an error "
                "unless --overwrite_output_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing run directory."})
    steps: int = field(default=120, metadata={"help": "Optimizer steps."})
    micro_batch_size: int = field(default=8, metadata={"help": "Examples per rank per forward pass."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr: Optional[float] = field(default=None, metadata={"help": "Peak learning rate (default 1e-5; 5e-4 for the toy world)."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warm-up steps, then linear decay to 0."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 = off)."})
    ds_config: str = field(default="zero3", metadata={
        "help": "DeepSpeed config: a name from ds_configs/ (zero2, zero3, zero3_offload) or a JSON path."})
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": "Training precision."})
    activation_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and initialisation."})
    log_every: int = field(default=10, metadata={"help": "Steps between log rows."})
    save_every: int = field(default=0, metadata={"help": "Steps between checkpoints (0: only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Newest complete checkpoints kept (0: all)."})
    resume: str = field(default="never", metadata={
        "help": "'auto': continue from the newest complete checkpoint in --output_dir if there is one; "
                "a checkpoint directory: continue from it; 'never': start afresh."})
    export_hf: bool = field(default=True, metadata={
        "help": "At the end, write the model in Hugging Face format (16-bit safetensors) to <output_dir>/hf."})
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
    evaluate: bool = field(default=True, metadata={"help": "Evaluate before and after unlearning (toy world)."})
    evaluate_before: bool = field(default=True, metadata={"help": "With --evaluate: also evaluate before unlearning."})
    eval_every: int = field(default=0, metadata={
        "help": "Steps between evaluations of the in-distribution harmless rate during training (toy world; "
                "0: none). Logged as eval/harmless_rate."})
    eval_prompts: Optional[str] = field(default=None, metadata={
        "help": "Harmful prompts to evaluate on, a JSONL file of {prompt, split} rows (split optional, e.g. id, "
                "ood, adversarial/role_play). Default with --data toy: the toy world's splits."})
    judge: str = field(default="rule", metadata={
        "help": "Harmfulness judge: 'rule' (toy world) or a local Hugging Face sequence-classification model dir."})
    judge_harmless_labels: Optional[str] = field(default=None, metadata={
        "help": "With a classifier --judge: comma-separated label names (or ids) that mean harmless."})
    max_new_tokens: int = field(default=24, metadata={"help": "Tokens generated per evaluation prompt."})
    eval_batch_size: int = field(default=32, metadata={"help": "Prompts per generation batch per rank."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, MethodArguments, TrainArguments, EvalArguments)


@dataclass
class RunConfig:
    model: ModelArguments
    data: DataArguments
    method: MethodArguments
    train: TrainArguments
    eval: EvalArguments

    def to_dict(self) -> dict:
        return {name: asdict(getattr(self, name)) for name in ("model", "data", "method", "train", "eval")}


class _Parser(HfArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise ConfigError(message)


def _file_to_args(path: str) -> list:
    """The options of a YAML/JSON config file as command-line words, so the parser checks them."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:
        raise ConfigError(f"--config {path}: cannot parse ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: must hold a mapping of option: value")
    known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls)}
    words = []
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"--config {path}: unknown option '{key}'")
        if isinstance(value, bool):
            value = str(value).lower()
        words += [f"--{key}", str(value)]
    return words


def parse_config(argv: list | None = None) -> RunConfig:
    """Parse defaults < --config file < command line into a validated RunConfig."""
    argv = list(sys.argv[1:] if argv is None else argv)
    file_args = []
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ConfigError("--config needs a file path")
        file_args = _file_to_args(argv[at + 1])
        del argv[at:at + 2]
    parser = _Parser(ARGUMENT_CLASSES)
    try:
        parsed = parser.parse_args_into_dataclasses(args=file_args + argv, look_for_args_file=False)
    except ValueError as e:  # unknown options, or a __post_init__ check
        message = str(e)
        if "not used by the HfArgumentParser" in message:
            message = "unknown option(s): " + message.split(":", 1)[1].strip()
        raise ConfigError(message) from None
    return RunConfig(*parsed)
