"""Checkpoints that survive crashes: write, verify, then switch.

Layout under ``<run_dir>/checkpoints/``:
    step00000040/           DeepSpeed's files for that step (every rank writes its own shards)
        rank00000_state.pt  per-rank trainer state (Trainer.state_dict: step, data cursor, RNG states)
        manifest.json       written last, by rank 0, once every rank's files are on disk: names and sizes
    latest                  the tag of the newest verified checkpoint, replaced atomically

A checkpoint counts only if its manifest exists and every file in it has the recorded size, so a
crash in the middle of a save leaves the previous checkpoint in charge. Run directories are assumed
to be on a file system that every rank sees (as DeepSpeed's own loading assumes).
"""
import json
import os
import shutil

import torch

from . import distributed

MANIFEST = "manifest.json"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _files_with_sizes(directory: str) -> dict:
    out = {}
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, directory)] = os.path.getsize(path)
    return out


def save(engine, run_dir: str, step: int, state: dict, keep: int, hooks=None) -> str:
    """Save a checkpoint of ``step``: the engine's model, optimizer and schedule (DeepSpeed writes each
    rank's partitions) and this rank's ``state`` (collective: every rank calls it). Returns its directory."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    directory = os.path.join(root, tag)
    if distributed.is_main():
        shutil.rmtree(directory, ignore_errors=True)  # a leftover of a save that crashed
    distributed.barrier()
    engine.save_checkpoint(root, tag=tag, save_latest=False)
    torch.save(state, os.path.join(directory, f"rank{distributed.rank():05d}_state.pt"))
    if hooks is not None:
        hooks.during_save(step, "shards_written")
    distributed.barrier()  # every rank's files are written
    if distributed.is_main():
        manifest = {"step": step, "world_size": distributed.world_size(), "files": _files_with_sizes(directory)}
        _write_atomically(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1))
        _write_atomically(os.path.join(root, "latest"), tag)
        _prune(root, keep)
    distributed.barrier()
    return directory


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: str, keep: int) -> None:
    if keep <= 0:
        return
    tags = sorted(t for t in os.listdir(root) if t.startswith("step") and os.path.isdir(os.path.join(root, t)))
    for tag in tags[:-keep]:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


def problem_with(directory: str) -> str | None:
    """Why the checkpoint in ``directory`` cannot be used, or None if it is complete."""
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest_path):
        return "no manifest (the save did not finish)"
    with open(manifest_path) as f:
        manifest = json.load(f)
    for name, size in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"missing file {name}"
        if os.path.getsize(path) != size:
            return f"file {name} is {os.path.getsize(path)} bytes, {size} expected (truncated?)"
    return None


def newest_complete(run_dir: str, log=print) -> str | None:
    """The newest complete checkpoint directory of a run, reporting each newer one that is broken."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return None
    tags = sorted((t for t in os.listdir(root) if t.startswith("step")), reverse=True)
    for tag in tags:
        problem = problem_with(os.path.join(root, tag))
        if problem is None:
            return os.path.join(root, tag)
        log(f"wpn_dist: checkpoint {os.path.join(root, tag)} is unusable: {problem}; trying an older one")
    return None


def load(engine, directory: str) -> dict:
    """Restore the engine (weights, optimizer, scheduler) and return this rank's saved state (collective)."""
    with open(os.path.join(directory, MANIFEST)) as f:
        saved_world = json.load(f)["world_size"]
    if saved_world != distributed.world_size():
        distributed.fail(f"checkpoint {directory} was saved by {saved_world} ranks; resume it with {saved_world} "
                         f"ranks, not {distributed.world_size()}")
    root, tag = os.path.split(directory.rstrip("/"))
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {directory}")
    return torch.load(os.path.join(directory, f"rank{distributed.rank():05d}_state.pt"), weights_only=False)
