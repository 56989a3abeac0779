"""Utility on lm-evaluation-harness tasks (an optional extra: ``pip install -e ".[lmeval]"``).

``run_lm_eval`` scores an in-memory Hugging Face causal LM (a full copy, e.g. loaded from a run's
exported ``hf/`` directory, not a ZeRO-3-partitioned engine) on lm_eval tasks, wrapped in lm_eval's
``HFLM``. Under a torch.distributed process group:

- ``mode="rank0"``: rank 0 evaluates everything, the other ranks wait; rank 0's results are broadcast.
- ``mode="sharded"``: every rank holds the model and scores every world_size-th document of each
  task (lm_eval's own data-parallel split); the per-document metric values of all ranks are gathered
  on rank 0, which aggregates them exactly as a single process would, and the results are broadcast.

Without a process group both modes evaluate locally.
"""
import contextlib
import datetime
import difflib
import functools
import os
import random

import torch

from . import distributed

MODES = ("rank0", "sharded")
WAIT_HOURS = 24  # how long, in rank0 mode, the other ranks wait for rank 0


def import_lm_eval():
    """lm_eval, or an ImportError saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise ImportError("lm-evaluation-harness is not installed: pip install -e \".[lmeval]\" "
                          "(or pip install lm-eval)") from None
    return lm_eval


def run_lm_eval(model, tokenizer, tasks: list, include_path: str | None = None,
                limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                mode: str = "rank0", bootstrap_iters: int = 1000) -> dict:
    """Evaluate ``model`` on lm_eval ``tasks``; every rank calls it (collective under a process group).

    ``include_path``: a directory (or YAML file) of task configs of your own, searched besides
    lm_eval's. ``limit``: at most this many documents per task (a float < 1: that fraction).
    ``bootstrap_iters``: resamples for the stderr of non-mean metrics (0: no stderr).

    Returns, on every rank, ``{task: {metric: value}}``: lm_eval's metrics with the ``,none`` filter
    suffix dropped (another filter stays, as ``metric/filter``), their standard errors as
    ``<metric>_stderr``, and ``num_docs``, the number of documents scored. Groups of tasks (e.g.
    ``mmlu``) also get their aggregate entry.
    """
    if mode not in MODES:
        raise ValueError(f"--lm_eval_mode must be one of {', '.join(MODES)}, got {mode!r}")
    tasks = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not tasks:
        raise ValueError("--lm_eval_tasks is empty: name at least one lm_eval task")
    if include_path is not None and not os.path.exists(include_path):
        raise ValueError(f"--lm_eval_include_path {include_path}: no such directory or file")
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError("run_lm_eval needs the whole model on every rank that runs it, not a ZeRO-3 "
                         "partitioned one: load the exported hf/ directory with from_pretrained")
    import_lm_eval()
    manager = task_manager(include_path, tasks)
    check_task_names(manager, tasks, include_path)
    world = distributed.world_size()
    evaluate = functools.partial(_evaluate, model, tokenizer, tasks, manager, limit, num_fewshot,
                                 batch_size, bootstrap_iters)
    if world == 1:
        return evaluate(rank=0, world=1)
    waiting = None
    if mode == "rank0":
        waiting = _waiting_group()  # created by every rank before rank 0 starts
        outcome = _attempt(evaluate, rank=0, world=1) if distributed.rank() == 0 else None
    else:
        outcome = _attempt(evaluate, rank=distributed.rank(), world=world)
        # A rank that failed says so: every rank then raises instead of waiting on the others.
        failures = [o for o in distributed.gather_objects(outcome) if "error" in o]
        if failures:
            outcome = failures[0]
    outcome = distributed.broadcast_object(outcome if distributed.rank() == 0 else None, group=waiting)
    if "error" in outcome:
        raise RuntimeError(f"lm_eval failed on a rank: {outcome['error']}")
    return outcome["results"]


@functools.cache
def _waiting_group():
    """A gloo group of every rank whose collectives time out after WAIT_HOURS: in rank0 mode the other
    ranks wait for rank 0's results longer than the process group's timeout (30 min by default)."""
    import torch.distributed as dist
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=WAIT_HOURS))


@functools.lru_cache(maxsize=4)
def _cached_task_manager(include_path: str | None, include_defaults: bool = True):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(include_path: str | None = None, tasks: list = ()):
    """lm_eval's task index, built once per process. Indexing lm_eval's own thousands of task YAMLs
    takes about 10 s: when every one of ``tasks`` is a single task (not a group or tag) defined under
    ``include_path``, only ``include_path`` is indexed."""
    path = os.path.abspath(include_path) if include_path else None
    if path and tasks:
        own = _cached_task_manager(path, include_defaults=False)
        entries = [own.task_index.get(name) for name in tasks]
        if all(e is not None and e.kind.name in ("TASK", "PY_TASK") for e in entries):
            return own
    return _cached_task_manager(path)


def check_task_names(manager, tasks: list, include_path: str | None = None) -> None:
    """Raise ValueError naming the first task that is neither indexed (task, group or tag) nor a YAML file."""
    for name in tasks:
        if name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and os.path.isfile(name)):
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        where = f"neither among lm_eval's tasks nor in {include_path}" if include_path else "not among lm_eval's tasks"
        raise ValueError(f"--lm_eval_tasks: unknown task {name!r}{hint}: it is {where}; "
                         "tasks of your own go in a directory given with --lm_eval_include_path")


def _attempt(evaluate, **kwargs) -> dict:
    try:
        return {"results": evaluate(**kwargs)}
    except Exception as e:  # noqa: BLE001  (reported to every rank, then raised there)
        return {"error": f"rank {distributed.rank()}: {type(e).__name__}: {e}"}


def _evaluate(model, tokenizer, tasks, manager, limit, num_fewshot, batch_size, bootstrap_iters,
              rank: int, world: int) -> dict | None:
    """One rank's share of the evaluation (all of it when ``world`` is 1). The returned results are
    rank 0's; other ranks get None."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    was_training = model.training  # HFLM puts the model in eval mode
    try:
        lm = (HFLM if world == 1 else _sharded_lm_class())(pretrained=model, tokenizer=tokenizer,
                                                           batch_size=batch_size)
        lm._rank, lm._world_size = rank, world  # HFLM assumes one process for an in-memory model
        with _rng_state_kept():  # simple_evaluate seeds the global RNGs
            out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                  log_samples=False)
    finally:
        model.train(was_training)
    return None if out is None else plain_results(out)


@functools.cache
def _sharded_lm_class():
    """HFLM whose collectives (used by lm_eval's data-parallel path) go through torch.distributed
    instead of HF Accelerate."""
    from lm_eval.models.huggingface import HFLM

    class ShardedHFLM(HFLM):
        def all_gather(self, tensor):
            return distributed.all_gather_no_grad(tensor.reshape(-1).to(distributed.device())).to(tensor.device)

        def gather_object(self, obj, dst=0):
            return distributed.gather_objects(obj)

        def barrier(self):
            distributed.barrier()

    return ShardedHFLM


def plain_results(out: dict) -> dict:
    """lm_eval's results as ``{task: {metric: float}}`` (see run_lm_eval)."""
    results = {}
    for task, values in out["results"].items():
        row = {}
        for key, value in values.items():
            if "," not in key or isinstance(value, str) or value is None:  # "alias", "N/A" stderr
                continue
            metric, filter_name = key.split(",", 1)
            row[metric if filter_name == "none" else f"{metric}/{filter_name}"] = float(value)
        count = out.get("n-samples", {}).get(task, {}).get("effective")
        if count is not None:
            row["num_docs"] = int(count)
        results[task] = row
    return results


@contextlib.contextmanager
def _rng_state_kept():
    import numpy as np
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
