"""The DeepSpeed engine: its config (a JSON file from ds_configs/ with the run's numbers filled in)
and ``deepspeed.initialize``."""
import copy
import json
import os

from . import distributed
from .options import OptionError as ConfigError

# The named configs: $WPN_DIST_DS_CONFIGS, else the installed package data (wpn_dist/ds_configs/, what
# `pip install .` ships from the checkout's ds_configs/), else the checkout's top-level ds_configs/.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_CONFIG_DIR = os.environ.get("WPN_DIST_DS_CONFIGS") or next(
    (d for d in (os.path.join(_PACKAGE_DIR, "ds_configs"), os.path.join(os.path.dirname(_PACKAGE_DIR), "ds_configs"))
     if os.path.isdir(d)), os.path.join(os.path.dirname(_PACKAGE_DIR), "ds_configs"))


def read_ds_config(name_or_path: str) -> dict:
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(DS_CONFIG_DIR, f"{name_or_path}.json")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(DS_CONFIG_DIR) if f.endswith(".json")) if os.path.isdir(DS_CONFIG_DIR) else []
        raise ConfigError(f"--ds_config {name_or_path}: no such file (named configs: {', '.join(known)})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path}: not valid JSON ({e})") from None


def _fill(node, values: dict, path=""):
    """Replace every "auto" in ``node`` by ``values[dotted path]`` or else ``values[key]``; a key with
    no value is an error. Dotted paths come first so that, e.g., ``fp16.enabled`` and ``bf16.enabled``
    get their own values."""
    if isinstance(node, dict):
        for key, value in node.items():
            if value == "auto":
                dotted = f"{path}{key}"
                if dotted not in values and key not in values:
                    raise ConfigError(f"ds_config: no value for \"auto\" at {dotted}")
                node[key] = values[dotted] if dotted in values else values[key]
            else:
                _fill(value, values, f"{path}{key}.")


def build_ds_config(train, lr: float, world_size: int) -> dict:
    """The DeepSpeed config of the run: batch sizes, lr schedule, clipping and precision come from the
    run config, never from editing the JSON."""
    config = copy.deepcopy(read_ds_config(train.ds_config))
    values = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm,
        "lr": lr, "warmup_max_lr": lr, "weight_decay": train.weight_decay,
        "warmup_num_steps": max(1, train.warmup_steps), "total_num_steps": max(train.steps, train.warmup_steps + 1),
        # Precision blocks: bf16 follows --precision; fp16 (not a precision this trainer offers) is off.
        "bf16.enabled": train.precision == "bf16", "fp16.enabled": False,
    }
    _fill(config, values)
    if distributed.on_cpu():
        # No JIT-compiled optimizers on CPU: DeepSpeed's FusedAdam/CPUAdam builds take minutes there.
        # torch's fused AdamW, because its square root is the exact instruction: the unfused one's goes
        # through MKL's vector maths, whose last bit depends on the CPU's vendor (wpn_dist/app/kernels.py).
        config.setdefault("optimizer", {}).setdefault("params", {}).update(torch_adam=True, fused=True)
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def initialize(model, ds_config: dict):
    """Wrap ``model`` in a DeepSpeed engine; returns (engine, optimizer, scheduler)."""
    import deepspeed
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
    return engine, optimizer, scheduler


def initialize_reference(model, ds_config: dict):
    """The frozen original model as a second engine, for the baselines' KL terms: no optimizer; under
    ZeRO-3 its weights are partitioned like the trained model's, under other stages every rank holds
    a whole copy. Its memory and time are part of the method's cost."""
    import deepspeed
    config = {key: value for key, value in copy.deepcopy(ds_config).items() if key not in ("optimizer", "scheduler")}
    if zero_stage(config) != 3:
        config["zero_optimization"] = {"stage": 0}
    for p in model.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
