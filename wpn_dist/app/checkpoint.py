"""Checkpoints that survive every way a save can die: write beside, verify, then switch.

Layout under ``<run_dir>/checkpoints/``:
    step00000040/           a complete checkpoint: DeepSpeed's files (every rank writes its own shards)
        rank00000_state.pt  per-rank trainer state (Trainer.state_dict: step, data cursor, RNG states)
        manifest.json       written last, by rank 0, once every rank's files are on disk: names and sizes
    step00000050.partial/   a save in progress (or one that died): never read, removed by the next save
    latest                  the tag of the newest complete checkpoint, replaced atomically

A save writes into ``<tag>.partial``; every rank fsyncs the files it wrote; rank 0 writes and fsyncs
the manifest, renames the directory to ``<tag>`` (a re-save of an existing tag renames the old one
aside first and removes it only after the swap), fsyncs the checkpoint root and switches ``latest``.
A checkpoint counts only if it has its final name, its manifest and every file in the manifest with
the recorded size, so a crash at any point leaves the previous complete checkpoint in charge. Run
directories are assumed to be on a file system that every rank sees (as DeepSpeed's own loading
assumes).
"""
import json
import os
import re
import shutil
import time

import torch

from . import distributed

MANIFEST = "manifest.json"
PARTIAL, REPLACED = ".partial", ".replaced"
_TAG = re.compile(r"^step\d{8}$")
_USABLE = re.compile(r"^step\d{8}(\.replaced)?$")  # a swap that died between its renames leaves .replaced


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


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    _fsync_file(path)


def _written_by(name: str, rank: int) -> bool:
    """Whether ``name`` (a file of a checkpoint) is one this rank writes: DeepSpeed names each rank's
    partitions ``*_rank_<r>_*``, this module ``rank<r>_state.pt``; rank 0 also owns every file that
    names no rank (the model states file)."""
    ranks = [int(r) for r in re.findall(r"(?:pp_rank_|^rank)(\d+)", os.path.basename(name))]
    return rank in ranks if ranks else rank == 0


def save(engine, run_dir: str, step: int, state: dict, keep: int, hooks=None) -> str:
    """Save a checkpoint of ``step``: the engine's model, optimizer and schedule (DeepSpeed writes each
    rank's partitions) and this rank's ``state`` (collective: every rank calls it). Returns its directory."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    partial = os.path.join(root, tag + PARTIAL)
    if distributed.is_main():
        shutil.rmtree(partial, ignore_errors=True)  # a save of this step that died
    distributed.barrier()
    engine.save_checkpoint(root, tag=tag + PARTIAL, save_latest=False)
    torch.save(state, os.path.join(partial, f"rank{distributed.rank():05d}_state.pt"))
    if hooks is not None:
        hooks.during_save(step, "shards_written")
    for name in _files_with_sizes(partial):
        if _written_by(name, distributed.rank()):
            _fsync_file(os.path.join(partial, name))
    distributed.barrier()  # every rank's files are written and on disk
    if distributed.is_main():
        manifest = {"step": step, "world_size": distributed.world_size(), "files": _files_with_sizes(partial)}
        _write_atomically(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1))
        fsync_dir(partial)
        if hooks is not None:
            hooks.during_save(step, "manifest_written")
        final = os.path.join(root, tag)
        if os.path.isdir(final):  # a re-save of this step (e.g. ICU's stop): swap, never delete first
            shutil.rmtree(final + REPLACED, ignore_errors=True)  # left by a swap that died after its rename
            os.replace(final, final + REPLACED)
        os.replace(partial, final)
        fsync_dir(root)
        if hooks is not None:
            hooks.during_save(step, "renamed")
        _write_atomically(os.path.join(root, "latest"), tag)
        shutil.rmtree(final + REPLACED, ignore_errors=True)
        prune(root, keep)
    distributed.barrier()
    return os.path.join(root, tag)


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def _step_dirs(root: str) -> list:
    """Checkpoint directories by step; of one step, a leftover (.partial, .replaced) before the final one."""
    names = [t for t in os.listdir(root) if t.startswith("step") and os.path.isdir(os.path.join(root, t))]
    return sorted(names, key=lambda t: (t[:12], "." not in t, t))


def prune(root: str, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (0: all) and remove the rest, including every
    directory that is not a complete checkpoint (dead saves, leftovers of a swap). The newest complete
    checkpoint is never removed."""
    complete = [t for t in _step_dirs(root) if _USABLE.match(t) and problem_with(os.path.join(root, t)) is None]
    kept = set(complete if keep <= 0 else complete[-max(keep, 1):])
    for tag in _step_dirs(root):
        if tag not in kept:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


def problem_with(directory: str) -> str | None:
    """Why the checkpoint in ``directory`` cannot be used, or None if it is complete."""
    if not os.path.isdir(directory):
        return "no such directory"
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest_path):
        return "no manifest (the save did not finish)"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files, _, _ = manifest["files"], manifest["step"], manifest["world_size"]
    except (ValueError, KeyError, TypeError):
        return "its manifest is corrupt"
    for name, size in files.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"missing file {name}"
        if os.path.getsize(path) != size:
            return f"file {name} is {os.path.getsize(path)} bytes, {size} expected (truncated?)"
    return None


def saved_world_size(directory: str) -> int:
    """The number of ranks that saved a complete checkpoint."""
    with open(os.path.join(directory, MANIFEST)) as f:
        return int(json.load(f)["world_size"])


def newest_complete(run_dir: str, log=print) -> str | None:
    """The newest complete checkpoint directory of a run, reporting each newer one that is broken."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return None
    for tag in reversed([t for t in _step_dirs(root) if _USABLE.match(t)]):
        problem = problem_with(os.path.join(root, tag))
        if problem is None:
            return os.path.join(root, tag)
        log(f"wpn_dist: checkpoint {os.path.join(root, tag)} is unusable: {problem}; trying an older one")
    return None


def load(engine, directory: str) -> dict:
    """Restore the engine (weights, optimizer, scheduler) and return this rank's saved state (collective).
    The caller has checked that the checkpoint is complete and of this world size."""
    root, tag = os.path.split(directory.rstrip("/"))
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {directory}")
    return torch.load(os.path.join(directory, f"rank{distributed.rank():05d}_state.pt"), weights_only=False)


def estimated_bytes(num_params: int, precision: str) -> int:
    """Size of a ZeRO checkpoint: the fp32 master weights and Adam's two moments (12 bytes per
    parameter) plus the weights in the training dtype (2 bytes in bf16, 4 in fp32)."""
    return num_params * (12 + (2 if precision == "bf16" else 4))


def disk_needs(num_params: int, precision: str, keep_checkpoints: int, export_bytes_per_param: int) -> dict:
    """Bytes a run writes at its peak: ``keep_checkpoints`` complete checkpoints plus the next one
    being written beside them (the oldest goes only once the new one is complete), and the export."""
    one = estimated_bytes(num_params, precision)
    kept = max(1, keep_checkpoints) if keep_checkpoints else None  # 0 keeps every checkpoint: no bound
    return {"checkpoint": one, "checkpoints_peak": None if kept is None else one * (kept + 1),
            "export": num_params * export_bytes_per_param}


def describe_disk(needs: dict, keep_checkpoints: int) -> str:
    gib = lambda n: f"{n / 2**30:,.1f} GiB"  # noqa: E731
    peak = (f"{keep_checkpoints} kept + 1 being written = {gib(needs['checkpoints_peak'])}"
            if needs["checkpoints_peak"] is not None else "every checkpoint is kept (--keep_checkpoints 0): no bound")
    total = "" if needs["checkpoints_peak"] is None else \
        f"; at most {gib(needs['checkpoints_peak'] + needs['export'])} in all"
    return (f"disk: one checkpoint {gib(needs['checkpoint'])} (fp32 master weights and Adam moments, 12 B per "
            f"parameter, plus the training-dtype weights); {peak}; export {gib(needs['export'])}{total}")


def measure_write_speed(directory: str, num_bytes: int = 16 << 20) -> float:
    """Bytes per second of a written and fsynced file in ``directory`` (which must exist)."""
    path = os.path.join(directory, f".write-speed-{os.getpid()}")
    block = os.urandom(1 << 20)
    started = time.perf_counter()
    try:
        with open(path, "wb") as f:
            for _ in range(max(1, num_bytes >> 20)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        return num_bytes / max(time.perf_counter() - started, 1e-6)
    finally:
        if os.path.exists(path):
            os.remove(path)
