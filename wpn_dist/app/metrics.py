"""Run logging on rank 0: tensorboard scalars, one JSONL row per logged step, a progress bar.
On every other rank the logger is a no-op, so the training loop calls it unconditionally."""
import json
import os
import sys
import time

import torch


class RunLogger:
    def __init__(self, run_dir: str | None, total_steps: int, enabled: bool):
        self.enabled = enabled and run_dir is not None
        self.writer = self.rows = self.bar = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self.rows = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        # Redraw rarely when stderr is a log file rather than a terminal.
        self.bar = tqdm(total=total_steps, desc="unlearning", unit="step", dynamic_ncols=True,
                        mininterval=0.1 if sys.stderr.isatty() else 10.0)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.rows.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.rows.flush()
        if "loss/total" in values:
            self.bar.set_postfix(loss=f"{values['loss/total']:.4f}")

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def write(self, message: str) -> None:
        """Print above the progress bar (rank 0 only)."""
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.rows.close()


def memory_gib() -> dict:
    """Peak accelerator memory, or the process's resident memory on CPU."""
    if torch.cuda.is_available():
        return {"memory/max_allocated(GiB)": torch.cuda.max_memory_allocated() / 2**30,
                "memory/max_reserved(GiB)": torch.cuda.max_memory_reserved() / 2**30}
    import psutil
    return {"memory/rss(GiB)": psutil.Process().memory_info().rss / 2**30}
