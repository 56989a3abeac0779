"""The login-node step before a cluster run: fetch, check and size everything the run will read.

    python -m wpn_dist.prepare --model facebook/opt-6.7b --data PKU-Alignment/PKU-SafeRLHF \\
        --cache_dir /shared/hf [any other option of the run, or --config run.yaml]

It takes the run's own options, so it prepares exactly what that run reads:

1. fetches the model (weights, config, tokenizer) and the data into ``--cache_dir``, laid out as a
   Hugging Face home (``<cache_dir>/hub``), so that compute nodes read it with ``HF_HOME=<cache_dir>
   HF_HUB_OFFLINE=1`` and need no internet;
2. reads the data with the tokenizer as the run will, and prints its token-length distribution and
   the ``--max_length`` the run will use, with the number of responses it truncates;
3. builds the DeepSpeed ops the run's optimizer needs (FusedAdam, or CPU Adam with offload) into
   ``<cache_dir>/torch_extensions``, the ``TORCH_EXTENSIONS_DIR`` the templates use, instead of every
   rank compiling them on first use;
4. prints the disk the run needs: the checkpoints kept plus the one being written, and the export;
5. prints the environment the job needs.
"""
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

from . import distributed


@dataclass
class PrepareArguments:
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "The Hugging Face home to fill, on a filesystem the compute nodes see (default: $HF_HOME, else "
                "~/.cache/huggingface)."})
    build_ops: Literal["auto", "none"] = field(default="auto", metadata={
        "help": "auto: build the DeepSpeed ops the run's optimizer uses on this machine's accelerator (on a login "
                "node without GPUs: DS_ACCELERATOR=cuda, and TORCH_CUDA_ARCH_LIST set to the compute nodes' GPUs, "
                "e.g. 8.0 or 9.0); none: skip."})


def ops_needed(ds_config: dict, accelerator: str) -> list:
    """The DeepSpeed op builders a run's optimizer JIT-compiles on first use. On CPU the trainer uses
    torch's AdamW (wpn_dist/app/engine.py): nothing to build."""
    optimizer = ds_config.get("optimizer", {})
    if accelerator == "cpu" or not optimizer or optimizer.get("params", {}).get("torch_adam"):
        return []
    if optimizer.get("type", "").lower() not in ("adam", "adamw"):
        return []
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return ["CPUAdamBuilder"] if offload == "cpu" else ["FusedAdamBuilder"]


def build_ops(names: list) -> list:
    """Compile ``names`` (op builder class names) into TORCH_EXTENSIONS_DIR; returns (name, seconds)."""
    from deepspeed.accelerator import get_accelerator
    done = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible():
            raise OSError(f"DeepSpeed op {name} cannot be built on this machine ({get_accelerator().device_name()}); "
                          f"set DS_ACCELERATOR=cuda and TORCH_CUDA_ARCH_LIST, or pass --build_ops none")
        started = time.time()
        builder.load()  # JIT-compiles (minutes) unless an up-to-date build is in TORCH_EXTENSIONS_DIR
        done.append((name, time.time() - started))
    return done


def main(argv=None) -> int:
    from . import hub
    from .config import export_dtype_name, parse_config
    from .export import DTYPES
    from .trainer import resolve_defaults
    try:
        cfg, (args,) = parse_config(argv, extra_classes=(PrepareArguments,), prog="python -m wpn_dist.prepare",
                                    description=__doc__)
        cache_dir = os.path.abspath(os.path.expanduser(args.cache_dir or os.environ.get("HF_HOME")
                                                       or "~/.cache/huggingface"))
        # Read by wpn_dist.app.hub at call time, and by datasets (its own cache) when it is imported below.
        os.environ["HF_HOME"] = cache_dir
        os.environ.pop("HF_HUB_CACHE", None)
        hub.default_extensions_dir()
        resolve_defaults(cfg)
        return _prepare(cfg, args, cache_dir, DTYPES[export_dtype_name(cfg.train)].itemsize)
    except (ValueError, OSError) as e:
        print(f"wpn_dist: error: {e}", file=sys.stderr, flush=True)
        return 2


def _prepare(cfg, args, cache_dir: str, export_bytes_per_param: int) -> int:
    from . import checkpoint, hub, models
    from .data import read_examples, token_lengths, tokenize_examples
    from .engine import build_ds_config, read_ds_config
    from .preflight import output_root
    say = lambda message: print(f"wpn_dist/prepare: {message}", flush=True)  # noqa: E731
    if cfg.model.model == "toy":
        raise ValueError("--model toy needs no preparing (its model is built on first use); give --model")
    started = time.time()
    # 1. Fetch: as one process, which is local rank 0 of its node.
    sources = hub.resolve(cfg.model.model, cfg.model.model_init, cfg.model.tokenizer, cfg.data.data,
                          cfg.data.data_format)
    say(f"model {cfg.model.model}: {sources.model}")
    if sources.data != cfg.data.data:
        say(f"data {cfg.data.data}: {sources.data}")
    say(f"fetched into {cache_dir} in {time.time() - started:.0f}s ({_size_gib(os.path.join(cache_dir, 'hub')):.1f} "
        f"GiB in its hub cache)")
    # 2. The data as the run reads it.
    tokenizer = models.load_tokenizer(sources.model, sources.tokenizer)
    if cfg.data.data != "toy":
        examples = read_examples(sources.data, cfg.data.data_format, cfg.data.data_split)[0]
        lengths = token_lengths(tokenize_examples(examples, tokenizer, cfg.data.prompt_format))
        max_length = cfg.data.max_length or lengths.default_max_length(models.context_length(sources.model))
        say(f"{len(examples)} examples; {lengths.describe(max_length)}"
            + ("" if cfg.data.max_length else " (the run's default --max_length)"))
    # 3. DeepSpeed ops: those a GPU run of this --ds_config compiles on first use.
    from deepspeed.accelerator import get_accelerator
    build_ds_config(cfg.train, cfg.train.lr, max(1, distributed.env_world_size()))  # checks the config
    here, names = get_accelerator().device_name(), ops_needed(read_ds_config(cfg.train.ds_config), "cuda")
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "torch's default")
    if not names or args.build_ops == "none":
        say("no DeepSpeed ops to build" + (" (--build_ops none)" if names else " (the optimizer needs none)"))
    elif here == "cpu":
        say(f"not built: {', '.join(names)} (the GPU run's optimizer), as this machine has no GPU; to build it here, "
            f"set DS_ACCELERATOR=cuda and TORCH_CUDA_ARCH_LIST to the compute nodes' GPUs (e.g. 9.0), else the first "
            f"job builds it once into {where} (the other ranks wait for its lock)")
    else:
        for name, seconds in build_ops(names):
            say(f"built DeepSpeed op {name} in {seconds:.0f}s into {where}")
    # 4. Disk.
    num_params = sum(p.numel() for p in models.meta_model(sources.model).parameters())
    needs = checkpoint.disk_needs(num_params, cfg.train.precision, cfg.train.keep_checkpoints, export_bytes_per_param)
    say(f"{num_params / 1e9:.2f}B parameters, --precision {cfg.train.precision}; "
        + checkpoint.describe_disk(needs, cfg.train.keep_checkpoints)
        + f"; runs go to --output_dir, or {output_root()}/ by default")
    # 5. The job's environment.
    say(f"for the job: export HF_HOME={cache_dir} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "
        f"TORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']}")
    return 0


def _size_gib(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):  # snapshots link to blobs: count each blob once
                total += os.path.getsize(full)
    return total / 2**30
