"""The scaling study's outputs, rebuilt from its rows (``DIR/rows.jsonl``) after every sweep:

- ``DIR/results.csv``: one line per point, every column (COLUMNS first, then any others);
- ``DIR/vs_model_size.png``, ``DIR/vs_negatives.png``: median step time (bars: quartiles) and tokens/s
  against the model's parameter count and against K, one series per configuration;
- ``DIR/memory_vs_stage.png``: peak memory against ZeRO stage / offload (and recompute);
- ``DIR/tensorboard/``: per point, the time of every timed step and the row's summary numbers.
"""
import csv
import json
import os
import shutil
from collections import defaultdict

from .grid import POINT_DEFAULTS

COLUMNS = [
    # identity and outcome
    "point_id", "label", "status", "failure", "error_tail", "projected",
    # the point's config
    *POINT_DEFAULTS,
    # the model
    "num_params", "num_layers", "hidden_size", "vocab_size", "zero_stage",
    # what one step processes (all ranks)
    "rows_per_step", "tokens_per_step", "executed_tokens_per_step", "useful_token_fraction",
    "reference_tokens_per_step",
    # time
    "step_time_median_s", "step_time_p25_s", "step_time_p75_s", "step_time_min_s", "step_time_max_s",
    "steps_timed", "tokens_per_s", "tokens_per_s_per_gpu", "tokens_per_s_vs_lm", "step_time_vs_padded",
    "peak_memory_vs_padded",
    # FLOPs and utilisation
    "model_flops_per_step", "hardware_flops_per_step", "model_tflops_per_gpu", "hardware_tflops_per_gpu",
    "peak_tflops_per_gpu", "mfu", "hfu",
    # memory
    "peak_memory_gib", "memory_kind", "gpu_max_allocated_gib", "gpu_max_reserved_gib", "host_peak_rss_gib",
    # time to unlearn
    "steps_to_target", "final_harmless_rate", "time_to_unlearn_s", "time_to_unlearn_source",
    # sanity
    "loss_first", "loss_last", "setup_s",
    # machine and versions
    "device_kind", "device_name", "device_memory_gib", "host", "cpu_model", "cpu_cores",
    "python", "torch", "deepspeed", "transformers", "cuda",
    # bookkeeping
    "started_at", "wall_s", "command", "log", "step_times_s",
]
# Fields that say how a point was run rather than what was run: not part of a plot series' identity.
_RUN_FIELDS = {"steps", "warmup_steps", "timeout_s", "seed", "eval_every", "target_harmless_rate", "toy"}


def read_rows(path: str) -> list:
    """The rows of a rows.jsonl; a later row of the same point replaces an earlier one."""
    if not os.path.isfile(path):
        return []
    by_id = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_id[row["point_id"]] = row
    return list(by_id.values())


def with_estimates(rows: list) -> list:
    """Rows with time to unlearn filled in: measured for toy rows; for measured step rows, the steps
    a toy run of the same method needed times this row's median step time (an estimate that assumes
    the step count carries over from the toy world; marked in time_to_unlearn_source)."""
    toy_steps = {}
    for row in rows:
        if row.get("toy") and row.get("status") == "ok" and row.get("steps_to_target") is not None:
            toy_steps[row["method"]] = row["steps_to_target"]
    out = []
    for row in rows:
        row = dict(row)
        if not row.get("toy") and row.get("status") == "ok" and row["method"] in toy_steps:
            row["steps_to_target"] = toy_steps[row["method"]]
            row["time_to_unlearn_s"] = row["steps_to_target"] * row["step_time_median_s"]
            row["time_to_unlearn_source"] = "toy run's steps_to_target x this median step time (estimate)"
        out.append(row)
    return out


def with_lm_ratio(rows: list) -> list:
    """Rows with ``tokens_per_s_vs_lm``: a method's tokens/s over that of the ``lm`` row whose config is
    the same apart from the method and its options (packed: the LM step over the same distinct tokens;
    padded: over the same padded batch). And ``step_time_vs_padded`` / ``peak_memory_vs_padded``: the
    padded row of the same config over a packed one."""
    def key(row):
        return tuple(json.dumps(row.get(k)) for k in POINT_DEFAULTS if k not in ("method", "positive_lm"))

    def same_but_layout(row):
        return tuple(json.dumps(row.get(k)) for k in POINT_DEFAULTS if k != "layout")
    padded = {same_but_layout(r): r for r in rows if r.get("layout") == "padded" and r.get("status") == "ok"}
    lm = {key(r): r["tokens_per_s"] for r in rows
          if r.get("method") == "lm" and r.get("status") == "ok" and not r.get("toy") and r.get("tokens_per_s")}
    out = []
    for row in rows:
        row = dict(row)
        if row.get("method") != "lm" and row.get("status") == "ok" and not row.get("toy") and key(row) in lm \
                and row.get("tokens_per_s"):
            row["tokens_per_s_vs_lm"] = row["tokens_per_s"] / lm[key(row)]
        old = padded.get(same_but_layout(row))
        if row.get("layout") == "packed" and row.get("status") == "ok" and old is not None:
            row["step_time_vs_padded"] = old["step_time_median_s"] / row["step_time_median_s"]
            if old.get("peak_memory_gib") and row.get("peak_memory_gib"):
                row["peak_memory_vs_padded"] = old["peak_memory_gib"] / row["peak_memory_gib"]
        out.append(row)
    return out


def _cell(value):
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else value


def write_csv(rows: list, path: str, columns: list = COLUMNS) -> list:
    """Write every row with every column (the known ones first); returns the header."""
    header = list(columns) + sorted({k for r in rows for k in r} - set(columns))
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in header})
    os.replace(path + ".tmp", path)
    return header


# --- plots -----------------------------------------------------------------------------------

def _series(rows: list, x_of, exclude: set) -> dict:
    """Rows grouped by every config field not in ``exclude`` (nor a run field): series label -> sorted
    [(x, row)]. The label names the fields that differ between series (method first)."""
    fields = [k for k in POINT_DEFAULTS if k not in exclude and k not in _RUN_FIELDS]
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k) for k in fields)].append((x_of(row), row))
    varying = [k for k in fields if len({key[fields.index(k)] for key in groups}) > 1]
    varying.sort(key=lambda k: k != "method")
    series = {}
    for key, members in groups.items():
        name = ", ".join(f"{k}={key[fields.index(k)]}" if k != "method" else str(key[fields.index(k)])
                         for k in varying) or str(key[fields.index("method")])
        series[name] = sorted(members, key=lambda m: m[0])
    return series


def _line_panels(rows: list, x_of, exclude: set, xlabel: str, title: str, path: str, logx: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    series = _series(rows, x_of, exclude)
    for name, members in series.items():
        xs = [x for x, _ in members]
        med = [r["step_time_median_s"] for _, r in members]
        low = [m - r["step_time_p25_s"] for m, (_, r) in zip(med, members)]
        high = [r["step_time_p75_s"] - m for m, (_, r) in zip(med, members)]
        axes[0].errorbar(xs, med, yerr=[low, high], marker="o", capsize=3, label=name)
        axes[1].plot(xs, [r["tokens_per_s"] for _, r in members], marker="o", label=name)
    for ax, ylabel in zip(axes, ("median step time (s); bars: quartiles", "tokens/s (all ranks)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if logx:
            ax.set_xscale("log")
        if not series:
            ax.text(0.5, 0.5, "no measured rows", ha="center", va="center", transform=ax.transAxes)
    if series:
        axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stage(row: dict) -> str:
    return row["ds_config"] + ("+ckpt" if row.get("activation_checkpointing") else "")


def _memory_panel(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = ["zero0", "zero2", "zero3", "zero3_offload_optimizer", "zero3_offload"]
    stages = sorted({_stage(r) for r in rows}, key=lambda s: (order.index(s.split("+")[0]), s))
    fig, ax = plt.subplots(figsize=(8, 4.6))
    series = _series(rows, lambda r: stages.index(_stage(r)), {"ds_config", "activation_checkpointing"})
    for name, members in series.items():
        ax.plot([x for x, _ in members], [r["peak_memory_gib"] for _, r in members], marker="o", label=name)
    ax.set_xticks(range(len(stages)), stages)
    kinds = sorted({r.get("memory_kind") for r in rows if r.get("memory_kind")})
    ax.set_ylabel(f"peak memory (GiB; {', '.join(kinds) or 'none'})")
    ax.set_xlabel("ZeRO stage / offload (+ckpt: activation checkpointing)")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no measured rows", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Peak memory per rank against ZeRO stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(rows: list, out: str) -> list:
    measured = [r for r in rows if r.get("status") == "ok" and not r.get("toy")]
    paths = [os.path.join(out, name) for name in ("vs_model_size.png", "vs_negatives.png", "memory_vs_stage.png")]
    _line_panels(measured, lambda r: r["num_params"], {"model"}, "parameters", "Step time and throughput against "
                 "model size", paths[0], logx=True)
    _line_panels(measured, lambda r: r["negatives"], {"negatives"}, "K (negatives per example)",
                 "Step time and throughput against K", paths[1], logx=False)
    _memory_panel(measured, paths[2])
    return paths


# --- tensorboard -----------------------------------------------------------------------------

SUMMARY_SCALARS = ("step_time_median_s", "tokens_per_s", "model_tflops_per_gpu", "mfu", "hfu", "peak_memory_gib",
                   "time_to_unlearn_s")


def write_tensorboard(rows: list, out: str) -> str:
    """DIR/tensorboard, rebuilt: one run per point (its label and id), with ``step_time_s`` per timed
    step and ``summary/<column>`` at step 0."""
    from torch.utils.tensorboard import SummaryWriter
    root = os.path.join(out, "tensorboard")
    shutil.rmtree(root, ignore_errors=True)
    for row in rows:
        if row.get("status") != "ok":
            continue
        writer = SummaryWriter(os.path.join(root, f"{row['label']}-{row['point_id'][:8]}"))
        for i, seconds in enumerate(row.get("step_times_s") or []):
            writer.add_scalar("step_time_s", seconds, i + 1)
        for name in SUMMARY_SCALARS:
            if row.get(name) is not None:
                writer.add_scalar(f"summary/{name}", row[name], 0)
        writer.close()
    return root


def write_all(rows: list, out: str, plots: bool = True) -> dict:
    """results.csv, the plots (unless not ``plots``) and tensorboard from the rows; returns their paths
    and the rows as written."""
    rows = with_lm_ratio(with_estimates(rows))
    csv_path = os.path.join(out, "results.csv")
    write_csv(rows, csv_path)
    return {"csv": csv_path, "plots": write_plots(rows, out) if plots else [], "tensorboard": write_tensorboard(rows, out),
            "rows": rows}
