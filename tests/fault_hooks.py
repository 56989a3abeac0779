"""Fault injection for the crash-safety tests, installed into a run through the trainer's hooks:
``WPN_DIST_HOOKS=fault_hooks:FaultHooks`` and ``WPN_DIST_FAULT=<name>:<step>`` (tests/ on PYTHONPATH)."""
import errno
import json
import os
import signal
import time

from wpn_dist.app.distributed import rank, world_size
from wpn_dist.app.hooks import Hooks


class FaultHooks(Hooks):
    def __init__(self):
        name, _, step = os.environ.get("WPN_DIST_FAULT", "").partition(":")
        self.name, self.step = name, int(step or -1)

    def _now(self, name: str, step: int) -> bool:
        return self.name == name and self.step == step

    def loss(self, step, loss):
        return loss * float("nan") if self._now("nan_at_step", step) else loss

    def after_step(self, step):
        if self._now("usr1_last_rank_at_step", step) and rank() == world_size() - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        if self._now("exit_after_step", step):
            os._exit(17)  # as a killed process would: no cleanup, no exception handlers

    def during_save(self, step, phase):
        if self._now("crash_in_save", step) and phase == "shards_written":
            os._exit(17)
        # SIGKILL of one rank in a phase of the save: rank 1 while the shards are written (every rank's
        # files are there, no manifest), rank 0 after the manifest or after the rename (only rank 0
        # reaches those phases).
        if self._now(f"kill_at_{phase}", step) and rank() == (1 if phase == "shards_written" else 0):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._now("enospc_in_save", step) and phase == "shards_written" and rank() == 1:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if self._now("sigterm_in_save", step) and phase == "shards_written":
            os.kill(os.getpid(), signal.SIGTERM)  # every rank, as Slurm signals every task




class RecordingHooks(Hooks):
    """Records every micro-batch's total loss (``WPN_DIST_RECORD``: a JSONL path per rank, with
    ``{rank}`` in it) and spends ``WPN_DIST_PAUSE_S`` seconds after every step, as an evaluation or a
    checkpoint would, outside the step; with ``WPN_DIST_WAIT_FOR``, it holds after step 1 until that
    file exists."""

    def __init__(self):
        self.path = os.environ["WPN_DIST_RECORD"].format(rank=rank())
        self.pause = float(os.environ.get("WPN_DIST_PAUSE_S", "0"))

    def loss(self, step, loss):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "loss": float(loss)}) + "\n")
        return loss

    def after_step(self, step):
        time.sleep(self.pause)
        # WPN_DIST_WAIT_FOR=path: after step 1, hold the run (and its lock) until that file exists.
        release = os.environ.get("WPN_DIST_WAIT_FOR")
        deadline = time.time() + 300
        while step == 1 and release and not os.path.exists(release) and time.time() < deadline:
            time.sleep(0.2)
