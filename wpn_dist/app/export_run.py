"""``python -m wpn_dist.export RUN_DIR``: write the Hugging Face directory of a run that has none, from
its newest complete checkpoint (a run whose own export was switched off, or that was stopped or ran
out of time).

A ZeRO-3 checkpoint is partitioned per rank, so this is started by the same launcher with the same
world size that saved it (``deepspeed --num_gpus N --module wpn_dist.export RUN_DIR``, or srun). It
builds the run again from its ``config.json`` and hands it to the trainer with the checkpoint as
``--resume`` and ``--steps`` at the checkpoint's step: the trainer loads it, trains zero steps, does not
evaluate, and exports. The run's record (summary.json) is left as it was. Paths in config.json (the
data, the model directory) are read again: start it from where the run was started.
"""
import argparse
import json
import os
import tempfile

from . import checkpoint, distributed
from .export import DTYPES, parse_size

DEFAULT_SHARD_SIZE = "5GB"
GROUPS = ("model", "data", "method", "train", "eval")  # config.json's groups (RunConfig.to_dict)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wpn_dist.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("run_dir", help="A run directory (--output_dir of the run) with a complete checkpoint.")
    parser.add_argument("--out", default=None, help="Where to write (default: RUN_DIR/hf; an existing one is replaced).")
    parser.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                        help="Dtype of the weights written; auto: the training dtype (default).")
    parser.add_argument("--max_shard_size", default=DEFAULT_SHARD_SIZE,
                        help="Largest safetensors file, e.g. 5GB (default), 500MB, or bytes.")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args(argv)


def trainer_options(run_dir: str, args: argparse.Namespace, saved: dict) -> tuple:
    """(the run's options as one mapping, for a --config file; the overrides; the checkpoint) for the
    trainer to load ``run_dir``'s newest complete checkpoint, train no step and export. Raises
    ValueError."""
    target = checkpoint.newest_complete(run_dir, log=distributed.print0)
    if target is None:
        raise ValueError(f"{run_dir} holds no complete checkpoint (checkpoints/stepNNNNNNNN with its manifest)")
    with open(os.path.join(target, checkpoint.MANIFEST)) as f:
        step = int(json.load(f)["step"])
    # None is an option left at its default (a config file cannot say None); local_rank is the launcher's.
    flat = {key: value for group in GROUPS for key, value in saved.get(group, {}).items()
            if value is not None and key != "local_rank"}
    overrides = ["--output_dir", run_dir, "--resume", target, "--steps", str(step), "--evaluate", "false",
                 "--export_hf", "true", "--overwrite_output_dir", "false"]  # never move the run aside
    # The export's own options: this command's, over the run's (on the command line they win over the file).
    overrides += ["--export_dir", args.out or os.path.join(run_dir, "hf"), "--export_dtype", args.dtype,
                  "--export_max_shard_size", args.max_shard_size]
    return flat, overrides, target


def main(argv=None) -> None:
    args = parse_args(argv)
    run_dir = args.run_dir.rstrip("/") or "/"
    config_file = os.path.join(run_dir, "config.json")
    try:
        parse_size(args.max_shard_size)
        with open(config_file, encoding="utf-8") as f:
            flat, overrides, target = trainer_options(run_dir, args, json.load(f))
        # Each rank writes its own copy of the options: no rank waits for another's file.
        fd, config_path = tempfile.mkstemp(prefix="wpn_dist-export-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(flat, f)
    except (ValueError, OSError) as e:
        distributed.fail(f"python -m wpn_dist.export {args.run_dir}: {e}")
    distributed.print0(f"wpn_dist: exporting {target}")
    from .trainer import main as train
    try:
        train(["--config", config_path] + overrides)  # resumed with no step left: loads, exports, records nothing
    finally:
        os.remove(config_path)
