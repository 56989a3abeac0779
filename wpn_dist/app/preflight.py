"""The checks a run makes before it touches anything, and the run directory's lock.

``check_run`` runs on every rank before the process group exists and before any directory is
created, renamed or written: the DeepSpeed JSON, the model, the resume target, the output directory
and the free disk for the next save. Every rank finds the same problem and exits 2 with one line
(rank 0 prints it). Options and data are checked by their own readers before it.

``take_lock`` runs on rank 0 once the group exists: a second job on the same run directory refuses to
start while the first one lives.
"""
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass

from . import checkpoint, distributed
from .options import OptionError


@dataclass
class Preflight:
    ds_config: dict
    resume_from: str | None      # the complete checkpoint to continue from, or None: a fresh run
    checkpoint_bytes: int        # estimated size of one checkpoint (0: unknown)


def _num_parameters(model: str) -> int:
    """Parameters of a spec name or local model directory (meta device: nothing is loaded), 0 for the
    toy world's model (tiny) or a hub id (unknown before download)."""
    from . import models
    if model == "toy" or not (model in models.MODEL_SPECS or models.is_local_model_dir(model)):
        return 0
    return sum(p.numel() for p in models.meta_model(model).parameters())


def _check_model(cfg, model_dir: str) -> None:
    from . import models
    name = model_dir
    if name == "toy" or cfg.model.model_init != "pretrained":
        return
    if name in models.MODEL_SPECS and models.MODEL_SPECS[name].hub_id is None:
        raise OptionError(f"--model {name} is an architecture without pretrained weights; "
                          f"add --model_init random, or give a model directory")
    if models.is_local_model_dir(name):
        weights = [f for f in os.listdir(name) if f.endswith((".safetensors", ".bin", ".safetensors.index.json"))]
        if not weights:
            raise OptionError(f"--model {name}: the directory has a config.json but no weights "
                              f"(*.safetensors or *.bin)")


def _resume_target(cfg, world_size: int) -> str | None:
    train = cfg.train
    if train.resume == "never":
        return None
    if train.resume == "auto":
        if train.output_dir is None:
            return None
        target = checkpoint.newest_complete(train.output_dir, log=distributed.print0)
        if target is None:
            return None
    else:
        target = train.resume.rstrip("/")
        problem = checkpoint.problem_with(target)
        if problem:
            raise OptionError(f"--resume {train.resume}: not a complete checkpoint ({problem})")
    saved = checkpoint.saved_world_size(target)
    if saved != world_size:
        raise OptionError(f"--resume: checkpoint {target} was saved by {saved} ranks; resume it with {saved} "
                          f"ranks, not {world_size}")
    return target


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def output_root() -> str:
    """Where runs go without --output_dir: $OUTPUT_ROOT, else $SCRATCH/wpn_dist on a cluster that has
    a scratch filesystem (checkpoints of large models do not belong in a home directory or a checkout),
    else runs/ under the working directory."""
    if os.environ.get("OUTPUT_ROOT"):
        return os.environ["OUTPUT_ROOT"]
    if os.environ.get("SCRATCH"):
        return os.path.join(os.environ["SCRATCH"], "wpn_dist")
    return "runs"


def _check_output_dir(cfg, checkpoint_bytes: int) -> None:
    train = cfg.train
    out = train.output_dir
    if out is not None:
        if os.path.exists(out) and not os.path.isdir(out):
            raise OptionError(f"--output_dir {out} is a file, not a directory")
        if os.path.isdir(out) and os.listdir(out) and not train.overwrite_output_dir and train.resume == "never":
            raise OptionError(f"--output_dir {out} already holds a run; continue it with --resume auto, "
                              f"choose another directory, or pass --overwrite_output_dir")
    out_name = out or f"{output_root()}/"
    where = _existing_ancestor(out if out is not None else output_root())
    if not os.access(where, os.W_OK):
        raise OptionError(f"--output_dir {out_name}: {where} is not writable")
    needed = checkpoint_bytes * 11 // 10  # the next save, with a tenth to spare
    free = shutil.disk_usage(where).free
    if needed and free < needed:
        raise OptionError(f"--output_dir {out_name}: the next checkpoint needs about {needed / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB are free on {where}")


def check_run(cfg, model_dir: str | None = None) -> Preflight:
    """Every check that needs no process group (raises OptionError/DataError/OSError with one line).
    ``model_dir``: where a hub id's files are (wpn_dist.app.hub), else the --model name itself."""
    from .engine import build_ds_config
    world_size = distributed.env_world_size()
    ds_config = build_ds_config(cfg.train, cfg.train.lr, world_size)
    model_dir = model_dir or cfg.model.model
    _check_model(cfg, model_dir)
    checkpoint_bytes = checkpoint.estimated_bytes(_num_parameters(model_dir), cfg.train.precision)
    resume_from = _resume_target(cfg, world_size)
    _check_output_dir(cfg, checkpoint_bytes)
    return Preflight(ds_config, resume_from, checkpoint_bytes)


# --- the run directory's lock ---------------------------------------------------------------------

LOCK = ".lock"


def _this_holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(run_dir: str) -> dict | None:
    """Who holds ``run_dir``'s lock and is still running, or None (no lock, or a stale one: a dead
    process on this host, or an earlier run of this same Slurm job, e.g. before a requeue)."""
    path = os.path.join(run_dir, LOCK)
    try:
        with open(path) as f:
            holder = json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return None  # a lock whose writer died mid-write
    me = _this_holder()
    if holder.get("job") and holder.get("job") == me["job"]:
        return None
    if holder.get("host") == me["host"]:
        return holder if holder.get("pid") != me["pid"] and _alive(int(holder.get("pid", -1))) else None
    return holder  # another host: it cannot be checked from here


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')}{job}, since {holder.get('started')}"


def take_lock(run_dir: str) -> str | None:
    """Make this process the holder of ``run_dir``'s lock (creating the directory). Returns why it
    cannot, or None."""
    holder = lock_holder(run_dir)
    if holder is not None:
        return (f"--output_dir {run_dir} is in use by another run ({describe(holder)}); if no such run is "
                f"alive, remove {os.path.join(run_dir, LOCK)}")
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(_this_holder(), f)
    try:
        os.link(tmp, path)  # atomic: fails if a lock exists
    except FileExistsError:
        holder = lock_holder(run_dir)
        if holder is not None:  # another run took it in the meantime
            return f"--output_dir {run_dir} is in use by another run ({describe(holder)})"
        os.replace(tmp, path)  # a stale lock: take it over
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return None


def release_lock(run_dir: str) -> None:
    path = os.path.join(run_dir, LOCK)
    try:
        with open(path) as f:
            if json.load(f).get("pid") != os.getpid():
                return
        os.remove(path)
    except (OSError, ValueError):
        pass
