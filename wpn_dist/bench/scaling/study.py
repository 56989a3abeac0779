"""The time-cost scaling study: every grid point measured in the real engine, one launch per point.

    python -m wpn_dist.scaling --preset cpu-tiny --out DIR           # a named preset (cpu-tiny, gpu-opt1.3b,
    python -m wpn_dist.scaling --grid grid.yaml --out DIR            #   gpu-sizes, toy-unlearn), or a grid file
    python -m wpn_dist.scaling --preset gpu-sizes --only model=opt-125m,opt-350m --out DIR   # a part of one
    python -m wpn_dist.scaling --project --out DIR --nodes 1,2,4,8 --gpus_per_node 8 --link_gbps 200 --latency_us 5

Per point (wpn_dist/bench/scaling/grid.py lists the fields) the DeepSpeed launcher starts
``wpn_dist/bench/scaling/worker.py`` on ``world_size`` ranks (GPUs, or CPU processes where there is no GPU:
DS_ACCELERATOR=cpu), or, for a ``toy: true`` point, ``wpn_dist/train.py`` on the toy world with
evaluations every ``eval_every`` steps. One JSON row per point is appended to ``DIR/rows.jsonl``: the
full config, the measurements and, for a point that failed (error, out of memory, timeout, or a value
that cannot run), ``status: failed`` with the failure and the tail of its log; the sweep goes on.
A rerun skips every point already in rows.jsonl (keyed by a digest of its config; ``--retry_failed``
runs failed points again). After the sweep ``DIR/results.csv``, the plots and ``DIR/tensorboard`` are
rebuilt from all rows (wpn_dist/bench/scaling/report.py); ``--project`` adds ``DIR/projected.csv``
(wpn_dist/bench/scaling/project.py). Logs of every launch are kept in ``DIR/logs/``.

What is counted (docs/benchmarks.md has the formulas and citations):
- ``tokens_per_step``: the useful tokens of a step on all ranks: the distinct tokens of its sequences
  (every response, one prompt per example; ga's random answers and normal rows), whatever the layout;
  ``tokens_per_s`` is that over the median step time, so layouts and methods compare at equal data.
  ``executed_tokens_per_step``: the tokens the forward runs over (packed: the same; padded: every row
  padded to the longest, each prompt once per row); ``useful_token_fraction`` = useful / executed.
  The frozen reference's forward tokens (ga, icu) are counted apart.
- ``tokens_per_s_vs_lm``: tokens/s over that of the lm point of the same config, which (packed) is the
  plain LM step over the same distinct tokens; ``step_time_vs_padded`` and ``peak_memory_vs_padded``:
  the padded point of the same config over this one (> 1: this one is faster, smaller).
- step time: between device synchronisations, slowest rank, after ``warmup_steps`` untimed steps.
"""
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import List, Optional

from . import grid as grid_lib
from ...app.options import OptionError, parse_options
from ..launch import REPO, launch, launcher
from .grid import GridError

WORKER = os.path.join(REPO, "wpn_dist", "bench", "scaling", "worker.py")
TRAIN = os.path.join(REPO, "wpn_dist", "train.py")
OOM_MARKERS = ("out of memory", "outofmemoryerror", "cuda_error_out_of_memory", "cannot allocate memory")


def on_cpu() -> bool:
    from ...app import distributed
    return distributed.on_cpu()


def error_tail(log_path: str, limit: int = 2000) -> str:
    """What went wrong, from a log: its last traceback up to the exception line if it has one, else
    its last characters."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    if not starts:
        return "\n".join(lines)[-limit:]
    end = starts[-1] + 1
    while end < len(lines) and (lines[end].startswith(" ") or not lines[end].strip()):
        end += 1
    return "\n".join(lines[starts[-1]:end + 1])[-limit:]


def failure_kind(tail: str, code: int | None, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if any(marker in tail.lower() for marker in OOM_MARKERS) or code in (-9, 137):
        return "oom"
    return "error"


# --- one point -------------------------------------------------------------------------------

def measured_row(point: dict, raw: dict) -> dict:
    """The row of a measured point: its raw numbers plus statistics, throughput, FLOPs and memory."""
    from .metrics import flops_columns, model_facts, step_time_stats
    row = {**point, **model_facts(point["model"]), **raw, **step_time_stats(raw["step_times_s"])}
    row["tokens_per_s"] = row["tokens_per_step"] / row["step_time_median_s"]
    row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / point["world_size"]
    on_gpu = raw.get("device_kind") == "cuda"
    row["peak_memory_gib"] = raw.get("gpu_max_allocated_gib") if on_gpu else raw.get("host_peak_rss_gib")
    row["memory_kind"] = "cuda max_memory_allocated" if on_gpu else "process peak RSS"
    row.update(flops_columns(row))
    return row


def run_measured(point: dict, run_dir: str, log_path: str, limit_s: float) -> dict:
    point_path, result_path = os.path.join(run_dir, "point.json"), os.path.join(run_dir, "result.json")
    with open(point_path, "w") as f:
        json.dump(point, f, indent=2)
    if os.path.exists(result_path):
        os.remove(result_path)
    command = launcher(point["world_size"]) + [WORKER, "--point", point_path, "--result", result_path]
    code, timed_out = launch(command, log_path, limit_s)
    if code == 0 and not timed_out and os.path.isfile(result_path):
        with open(result_path) as f:
            return {**measured_row(point, json.load(f)), "status": "ok", "command": " ".join(command)}
    return failed_row(point, command, log_path, code, timed_out, limit_s)


def failed_row(point: dict, command: list, log_path: str, code: int | None, timed_out: bool,
               limit_s: float) -> dict:
    """The row of a failed launch. A point stopped by the sweep's time budget rather than by its own
    timeout_s has failure "budget": it is not recorded, and runs again next time."""
    tail = error_tail(log_path)
    kind = failure_kind(tail, code, timed_out)
    if timed_out:
        if limit_s < point["timeout_s"]:
            kind = "budget"
        tail = f"no result within {limit_s:.0f}s: the launcher and its ranks were ended\n" + tail
    return {**point, "status": "failed", "failure": kind, "exit_code": code, "error_tail": tail,
            "command": " ".join(command)}


def toy_command(point: dict, run_dir: str) -> list:
    args = ["--method", point["method"], "--steps", str(point["steps"]), "--eval_every", str(point["eval_every"]),
            "--evaluate", "true", "--evaluate_before", "false", "--export_hf", "false", "--log_every", "1",
            "--micro_batch_size", str(point["micro_batch"]), "--precision", point["precision"],
            "--activation_checkpointing", str(point["activation_checkpointing"]).lower(), "--seed", str(point["seed"]),
            "--output_dir", os.path.join(run_dir, "run"), "--overwrite_output_dir"]
    if point["model"] != "toy":
        args += ["--model", point["model"], "--model_init", "random"]
    config = point["ds_config"]
    from .worker import VARIANTS, raw_ds_config
    if config in VARIANTS:  # a derived config: written out as a JSON file for train.py
        derived = raw_ds_config(config)
        config = os.path.join(run_dir, f"{config}.json")
        with open(config, "w") as f:
            json.dump(derived, f, indent=2)
    return launcher(point["world_size"]) + [TRAIN, "--ds_config", config] + args


def toy_numbers(metrics_path: str, point: dict) -> dict:
    """Steps to the target harmless rate, and step-time statistics, from a train.py metrics.jsonl
    (one row per step with log_every 1; eval/harmless_rate rows every eval_every steps)."""
    from .metrics import step_time_stats
    times, tokens_s, memory, rates = [], [], [], []
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            if "eval/harmless_rate" in row:
                rates.append((row["step"], row["eval/harmless_rate"]))
            if "step_time(s)" in row:
                times.append((row["step"], row["step_time(s)"]))
                tokens_s.append(row["throughput(tokens/s)"])
                memory.append(row.get("memory/max_allocated(GiB)", row.get("memory/rss(GiB)")))
    timed = [t for step, t in times if step > point["warmup_steps"]] or [t for _, t in times]
    reached = [step for step, rate in rates if rate >= point["target_harmless_rate"]]
    out = {"step_times_s": timed, **step_time_stats(timed),
           "steps_to_target": reached[0] if reached else None,
           "final_harmless_rate": rates[-1][1] if rates else None,
           "tokens_per_s": sorted(tokens_s)[len(tokens_s) // 2] if tokens_s else None,
           "peak_memory_gib": max((m for m in memory if m is not None), default=None)}
    if out["tokens_per_s"] is not None:
        out["tokens_per_s_per_gpu"] = out["tokens_per_s"] / point["world_size"]
    if reached and timed:
        out["time_to_unlearn_s"] = reached[0] * out["step_time_median_s"]
        out["time_to_unlearn_source"] = "measured: toy steps_to_target x median step time"
    else:
        best = max((rate for _, rate in rates), default=None)
        out["time_to_unlearn_source"] = (f"target {point['target_harmless_rate']} not reached in the "
                                         f"{times[-1][0] if times else 0} steps run (best rate {best})")
    return out


def run_toy(point: dict, run_dir: str, log_path: str, limit_s: float) -> dict:
    command = toy_command(point, run_dir)
    code, timed_out = launch(command, log_path, limit_s)
    metrics = os.path.join(run_dir, "run", "metrics.jsonl")
    if code == 0 and not timed_out and os.path.isfile(metrics):
        row = {**point, **toy_numbers(metrics, point), "status": "ok", "command": " ".join(command)}
        row["memory_kind"] = "process peak RSS" if on_cpu() else "cuda max_memory_allocated"
        return row
    return failed_row(point, command, log_path, code, timed_out, limit_s)


_MACHINE = {}


def machine_info() -> dict:
    """This machine's description (for rows that did not get one from a worker)."""
    if not _MACHINE:
        from .metrics import machine
        _MACHINE.update(machine(not on_cpu(), query_cuda=False))
    return dict(_MACHINE)


def run_point(point: dict, out: str, limit_s: float | None = None) -> dict:
    """Run one point (at most ``limit_s`` seconds, else its timeout_s) and return its row."""
    pid, name = grid_lib.point_id(point), grid_lib.label(point)
    base = {"point_id": pid, "label": name, "projected": False,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    started = time.time()
    why_not = grid_lib.problem(point)
    if why_not:
        row = {**point, "status": "failed", "failure": "invalid", "error_tail": why_not}
    else:
        run_dir = os.path.join(out, "points", f"{name}-{pid[:8]}")
        os.makedirs(run_dir, exist_ok=True)
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)
        log_path = os.path.join(out, "logs", f"{name}-{pid[:8]}.log")
        limit = point["timeout_s"] if limit_s is None else min(limit_s, point["timeout_s"])
        row = (run_toy if point["toy"] else run_measured)(point, run_dir, log_path, limit)
        row["log"] = log_path
    row = {**base, **row, "wall_s": time.time() - started}
    if "python" not in row:
        row.update({k: v for k, v in machine_info().items() if k not in row})
    return row


# --- the sweep -------------------------------------------------------------------------------

def rows_path(out: str) -> str:
    return os.path.join(out, "rows.jsonl")


def select(points: list, only: list) -> list:
    """Points whose fields match every ``field=value[,value...]`` filter (values compared as text)."""
    for spec in only:
        if "=" not in spec:
            raise GridError(f"--only {spec}: expected field=value[,value...]")
        field, values = spec.split("=", 1)
        if field not in grid_lib.POINT_DEFAULTS:
            raise GridError(f"--only {spec}: unknown field {field!r}")
        wanted = {v.strip().lower() for v in values.split(",")}
        points = [p for p in points if str(p[field]).lower() in wanted]
    return points


MIN_POINT_S = 30  # with a time budget, no point starts with less than this left


def sweep(points: list, out: str, retry_failed: bool = False, time_budget_s: float | None = None,
          log=print) -> dict:
    """Run every point not yet in DIR/rows.jsonl. With ``time_budget_s`` the sweep ends within that
    many seconds (plus up to 30 s to stop a launch): no point starts when less than MIN_POINT_S is left,
    and a point still running when the budget is spent is stopped and left for the next run, unrecorded.
    Returns counts of what happened."""
    from .report import read_rows
    os.makedirs(out, exist_ok=True)
    done = {r["point_id"]: r["status"] for r in read_rows(rows_path(out))}
    counts = {"run": 0, "ok": 0, "failed": 0, "skipped": 0, "left": 0}
    started = time.time()
    seen = set()
    for i, point in enumerate(points, start=1):
        pid, name = grid_lib.point_id(point), grid_lib.label(point)
        if pid in seen:
            continue
        seen.add(pid)
        if pid in done and (done[pid] == "ok" or not retry_failed):
            counts["skipped"] += 1
            log(f"scaling: [{i}/{len(points)}] {name}: {done[pid]} before, skipped")
            continue
        remaining = None if time_budget_s is None else time_budget_s - (time.time() - started)
        if remaining is not None and remaining < MIN_POINT_S:
            counts["left"] += 1
            continue
        row = run_point(point, out, remaining)
        if row.get("failure") == "budget":
            counts["left"] += 1
            log(f"scaling: [{i}/{len(points)}] {name}: stopped by the time budget after {row['wall_s']:.0f}s, "
                f"left for the next run")
            continue
        with open(rows_path(out), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        counts["run"] += 1
        counts[row["status"]] += 1
        if row["status"] == "ok":
            log(f"scaling: [{i}/{len(points)}] {name}: {_summary(row)} ({row['wall_s']:.0f}s)")
        else:
            last = ((row.get("error_tail") or "").strip().splitlines() or [""])[-1]
            log(f"scaling: [{i}/{len(points)}] {name}: FAILED ({row['failure']}): {last} ({row['wall_s']:.0f}s)")
    if counts["left"]:
        log(f"scaling: time budget spent; {counts['left']} point(s) left for a rerun of the same command")
    return counts


def _summary(row: dict) -> str:
    text = f"median step {row['step_time_median_s']:.4f}s" if row.get("step_time_median_s") else "no step times"
    if row.get("tokens_per_s"):
        text += f", {row['tokens_per_s']:.0f} tokens/s"
    if row.get("mfu") is not None:
        text += f", MFU {100 * row['mfu']:.1f}%"
    if row.get("toy"):
        unlearn = row.get("time_to_unlearn_s")
        text += f", steps to target {row.get('steps_to_target')}, time to unlearn " + \
            (f"{unlearn:.1f}s" if unlearn is not None else "- (target not reached)")
    return text


def table(rows: list) -> str:
    """A short plain-text table of the rows (printed at the end of a sweep)."""
    def fmt(value, spec):
        width = int(spec.split(".")[0])
        return f"{'-':>{width}}" if value is None else format(value, spec)
    lines = [f"{'point':58} {'status':7} {'useful':>6} {'step s':>8} {'tokens/s':>10} {'vs lm':>6} {'vs pad':>6} "
             f"{'TFLOP/s':>8} {'MFU %':>6} {'mem GiB':>8} {'unlearn s':>9}"]
    for r in rows:
        mfu = 100 * r["mfu"] if r.get("mfu") is not None else None
        lines.append(f"{r['label'][:58]:58} {r['status']:7} {fmt(r.get('useful_token_fraction'), '6.3f')} "
                     f"{fmt(r.get('step_time_median_s'), '8.4f')} "
                     f"{fmt(r.get('tokens_per_s'), '10.0f')} {fmt(r.get('tokens_per_s_vs_lm'), '6.2f')} "
                     f"{fmt(r.get('step_time_vs_padded'), '6.2f')} "
                     f"{fmt(r.get('model_tflops_per_gpu'), '8.3f')} {fmt(mfu, '6.1f')} "
                     f"{fmt(r.get('peak_memory_gib'), '8.2f')} {fmt(r.get('time_to_unlearn_s'), '9.1f')}")
    return "\n".join(lines)


def _repeatable(help_text: str, **extra) -> field:
    """A list option: repeatable, and one option may take several values (``--preset a b``)."""
    return field(default_factory=list, metadata={"action": "extend", "help": help_text + "; repeatable.", **extra})


@dataclass
class StudyOptions:
    """The options of ``python -m wpn_dist.scaling``: what to run."""
    out: str = field(metadata={"help": "Output directory (rows.jsonl, results.csv, plots, logs)."})
    grid: List[str] = _repeatable("A grid file (YAML or JSON)", metavar="FILE")
    preset: List[str] = _repeatable(f"A named grid: {', '.join(grid_lib.PRESETS)}", metavar="NAME")
    only: List[str] = _repeatable("Run only the points whose field has one of these values", metavar="FIELD=V1,V2")
    retry_failed: bool = field(default=False, metadata={"help": "Run points that failed before again."})
    time_budget_s: Optional[float] = field(default=None, metadata={
        "help": "End the sweep within this many seconds; points not done are left for the same command to run "
                "next time."})
    list: bool = field(default=False, metadata={"help": "Print the points and their state; run nothing."})
    plots: bool = field(default=True, metadata={
        "help": "Write the PNG plots (need matplotlib, the [bench] extra; --no_plots: without it)."})


@dataclass
class ProjectionOptions:
    """``--project``: projection of the measured rows to many nodes."""
    _argument_group_name = "projection to many nodes (wpn_dist/bench/scaling/project.py)"
    project: bool = field(default=False, metadata={"help": "Write DIR/projected.csv from the measured rows."})
    nodes: str = field(default="1,2,4,8", metadata={"help": "Node counts, comma-separated."})
    gpus_per_node: int = field(default=8, metadata={"help": "GPUs per node."})
    link_gbps: float = field(default=200.0, metadata={"help": "Per-GPU bandwidth between nodes, Gbit/s."})
    intra_node_gbps: float = field(default=2400.0, metadata={"help": "Per-GPU bandwidth within a node, Gbit/s."})
    latency_us: float = field(default=5.0, metadata={"help": "Latency per ring step, microseconds."})
    overlap: bool = field(default=False, metadata={"help": "Communication overlapped with compute."})
    global_batch: Optional[int] = field(default=None, metadata={
        "help": "Fixed global batch in examples (strong scaling); default: the per-GPU batch kept."})
    bucket_elems: float = field(default=5e7, metadata={"help": "DeepSpeed reduce bucket, elements."})

    def __post_init__(self):
        try:
            counts = self.node_counts
        except ValueError:
            raise OptionError(f"--nodes {self.nodes}: expected comma-separated integers") from None
        if not counts or min(counts) < 1 or self.gpus_per_node < 1 or self.link_gbps <= 0 \
                or self.intra_node_gbps <= 0 or self.latency_us < 0:
            raise OptionError("--nodes, --gpus_per_node, --link_gbps and --intra_node_gbps must be positive, "
                              "--latency_us >= 0")

    @property
    def node_counts(self) -> List[int]:
        return [int(n) for n in self.nodes.split(",") if n.strip()]


def parse_args(argv=None) -> SimpleNamespace:
    """defaults < --config file < command line, as one namespace (``nodes`` as a list of ints).
    Raises OptionError (one line) on a bad option."""
    (study, projection), _ = parse_options((StudyOptions, ProjectionOptions), argv, prog="python -m wpn_dist.scaling",
                                           description=__doc__)
    args = SimpleNamespace(**{**asdict(study), **asdict(projection), "nodes": projection.node_counts})
    if getattr(args, "out", None):
        args.out = os.path.abspath(args.out)  # the ranks run from the package's directory, not this one
    return args


def load_points(args) -> list:
    points = []
    for name in args.preset:
        if name not in grid_lib.PRESETS:
            raise GridError(f"--preset {name}: unknown (known: {', '.join(grid_lib.PRESETS)})")
        points += grid_lib.expand(grid_lib.PRESETS[name], f"preset {name}")
    for path in args.grid:
        points += grid_lib.expand(grid_lib.read_grid(path), path)
    return select(points, args.only)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through launch(), which stops the running point's ranks


def main(argv=None) -> dict:
    try:
        args = parse_args(argv)
    except OptionError as e:
        print(f"wpn_dist.scaling: error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.plots and not args.list:  # now, not after the sweep
        from ...app.extras import require_extra
        require_extra("bench", "plots need", "pass --no_plots", prog="wpn_dist.scaling")
    signal.signal(signal.SIGTERM, _terminated)
    if on_cpu():  # say so to DeepSpeed here too (its import in this process would warn about guessing)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .report import read_rows, write_all, write_csv
    try:
        points = load_points(args)
    except GridError as e:
        print(f"wpn_dist.scaling: error: {e}", file=sys.stderr)
        sys.exit(2)
    if not points and not args.project:
        print("wpn_dist.scaling: error: no points: give --preset or --grid (or --project alone)", file=sys.stderr)
        sys.exit(2)
    if args.list:
        done = {r["point_id"]: r["status"] for r in read_rows(rows_path(args.out))}
        for point in points:
            pid = grid_lib.point_id(point)
            print(f"{pid}  {done.get(pid, 'to run'):7}  {grid_lib.label(point)}")
        return {"points": points}
    counts = sweep(points, args.out, args.retry_failed, args.time_budget_s) if points else {}
    os.makedirs(args.out, exist_ok=True)
    outputs = write_all(read_rows(rows_path(args.out)), args.out, plots=args.plots)
    print(table(outputs["rows"]))
    print(f"wpn_dist.scaling: {', '.join([outputs['csv']] + [os.path.basename(p) for p in outputs['plots']])}, "
          f"{outputs['tensorboard']}")
    result = {"counts": counts, **outputs}
    if args.project:
        from .project import PROJECTED_COLUMNS, project, write_tensorboard
        projected = project(outputs["rows"], args.nodes, args.gpus_per_node, args.link_gbps, args.latency_us,
                            args.intra_node_gbps, args.overlap, args.global_batch, args.bucket_elems)
        path = os.path.join(args.out, "projected.csv")
        write_csv(projected, path, PROJECTED_COLUMNS)
        write_tensorboard(projected, args.out)
        print(f"wpn_dist.scaling: {len(projected)} projected rows (not measurements) in {path}")
        result["projected"] = projected
    return result


if __name__ == "__main__":
    main()
