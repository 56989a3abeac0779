"""Grid points of the scaling study: their fields and defaults, the named presets, reading a grid file,
expanding it into points, checking a point, and the key that identifies a point across reruns.

A grid file (YAML or JSON) is either one sweep (a mapping) or::

    defaults: {precision: bf16, seq_len: 512}      # applied to every point
    sweeps:                                        # each sweep: the product of its list values
      - {model: [opt-125m, opt-350m], method: [wpn, lm], negatives: 3}
      - {model: opt-6.7b, ds_config: zero3_offload, method: [wpn, lm]}
    points:                                        # single points, taken as they are
      - {model: tiny-opt, method: ga, world_size: 2}

A list value in a sweep is expanded (one point per value, crossed with the sweep's other lists);
a scalar is fixed. Unknown field names stop the study before anything runs (exit status 2); a bad
value (an unknown model, say) only fails its own point, which is recorded and the sweep goes on.
"""
import hashlib
import itertools
import json
import os

from ...core.methods import method_names

# Every field of a point, with its default. The comments are the documentation of the grid format.
POINT_DEFAULTS = {
    "model": "tiny-opt",        # a name of wpn_dist.models.MODEL_SPECS (random init, the spec's vocabulary);
                                # with toy: true, "toy" (the implanted toy model) or a spec name (random init)
    "method": "wpn",            # any registered method, or lm (plain causal-LM step over the same packed batch)
    "negatives": 4,             # K: harmful responses (negative rows) per example
    "micro_batch": 2,           # examples per rank per step; rows per rank = micro_batch * (1 + K) (+2 per
                                # example for ga's random-answer and normal rows)
    "seq_len": 128,             # tokens in every row (lengths: fixed)
    "prompt_len": None,         # tokens of the prompt part of every row (default seq_len // 4)
    "lengths": "fixed",         # fixed: every row seq_len tokens; pku: PKU-SafeRLHF-like, each prompt
                                # uniform in 20..80 tokens and each response in 50..300 (seq_len then only
                                # sets the attention term of the FLOPs count)
    "layout": "packed",         # packed: every prompt once, no padding; padded: one padded row per sequence.
                                # lm with packed: the plain LM step over the same distinct tokens, each
                                # sequence's own tokens a sequence of their own (the reference at equal
                                # useful tokens)
    "positive_lm": False,       # WPN: with its positive-LM term (weight 1), whose logits the LM head computes
    "ds_config": "zero3",       # zero0 (no ZeRO), zero2, zero3, zero3_offload (optimizer and parameters on
                                # CPU), zero3_offload_optimizer (only the optimizer on CPU)
    "activation_checkpointing": False,  # non-reentrant recompute of every layer in backward
    "precision": "fp32",        # fp32 or bf16
    "world_size": 1,            # ranks (GPUs, or CPU processes with DS_ACCELERATOR=cpu) on this machine
    "steps": 6,                 # timed steps (toy points: training steps of train.py)
    "warmup_steps": 2,          # steps run first and not timed (toy points: first logged steps left out)
    "global_negatives": True,   # WPN: negatives gathered from every rank
    "toy": False,               # a time-to-unlearn run of wpn_dist/train.py on the toy world
    "eval_every": 10,           # toy points: steps between harmless-rate evaluations
    "target_harmless_rate": 0.958,  # toy points: the rate that counts as unlearned
    "timeout_s": 900,           # the point fails as "timeout" after this many seconds
    "seed": 0,
}
LENGTHS = ("fixed", "pku")
LAYOUTS = ("packed", "padded")
DS_CONFIGS = ("zero0", "zero2", "zero3", "zero3_offload", "zero3_offload_optimizer")
PRECISIONS = ("fp32", "bf16")
_POSITIVE_INTS = ("negatives", "micro_batch", "seq_len", "world_size", "steps", "eval_every", "timeout_s")


class GridError(ValueError):
    """A grid that cannot be read (bad file, unknown field): the whole study stops."""


# --- presets ---------------------------------------------------------------------------------
# cpu-tiny runs in CI (about 2-3 minutes on 2 loaded CPU cores); the gpu-* presets are sized for the
# lent single H100/H200 (see docs/benchmarks.md for the command that splits each into ~8-minute parts).

_GPU = {"precision": "bf16", "seq_len": 512, "prompt_len": 128, "negatives": 3, "warmup_steps": 3, "steps": 8,
        "timeout_s": 480}

_EVERY_METHOD = ["wpn", "sft", "ga", "icu", "npo", "simnpo", "rmu", "rr", "lm"]

PRESETS = {
    "cpu-tiny": {
        "defaults": {"seq_len": 64, "prompt_len": 16, "micro_batch": 2, "steps": 5, "warmup_steps": 2,
                     "timeout_s": 240},
        "sweeps": [
            {"model": "tiny-opt", "method": "wpn", "negatives": [1, 4]},
            {"model": "tiny-opt", "method": "lm", "negatives": 4},
            {"model": "tiny-gpt-neo", "method": "wpn", "negatives": 4},
            {"model": "tiny-opt", "method": "wpn", "negatives": 4, "ds_config": "zero2"},
            {"model": "tiny-opt", "method": "wpn", "negatives": 4, "world_size": 2},
        ],
    },
    # The step's waste at PKU-like lengths on CPU: old (padded) and new (packed) layout, K = 2, 4, 8, WPN with
    # and without its positive-LM term, and the lm reference over the same useful tokens.
    "cpu-pku": {
        "defaults": {"model": "mini-opt", "lengths": "pku", "seq_len": 256, "micro_batch": 2, "steps": 7,
                     "warmup_steps": 1, "timeout_s": 600},
        "sweeps": [
            {"method": "wpn", "negatives": [2, 4, 8], "layout": ["packed", "padded"], "positive_lm": [False, True]},
            {"method": "lm", "negatives": [2, 4, 8], "layout": "packed"},
        ],
    },
    # Every method's step at PKU-like lengths on CPU, each with its frozen reference where it has one.
    "cpu-methods": {
        "defaults": {"model": "mini-opt", "lengths": "pku", "seq_len": 256, "micro_batch": 2, "negatives": 2,
                     "steps": 7, "warmup_steps": 1, "timeout_s": 600},
        "sweeps": [{"method": ["wpn", "sft", "ga", "icu", "npo", "simnpo", "rmu", "rr", "lm"]}],
    },
    # The same on the GPU at OPT-1.3B in bf16 (for the GPU issue; not measured yet).
    "gpu-pku": {
        "defaults": {**_GPU, "model": "opt-1.3b", "lengths": "pku", "seq_len": 256, "ds_config": "zero3",
                     "micro_batch": 8},
        "sweeps": [
            {"method": "wpn", "negatives": [2, 4, 8], "layout": ["packed", "padded"], "positive_lm": [False, True]},
            {"method": "lm", "negatives": [2, 4, 8], "layout": "packed"},
        ],
    },
    # WPN against the lm ceiling at OPT-1.3B: ZeRO stage, micro-batch, recompute.
    "gpu-opt1.3b": {
        "defaults": {**_GPU, "model": "opt-1.3b"},
        "sweeps": [
            {"method": ["wpn", "lm"], "ds_config": "zero0", "micro_batch": [4, 8]},
            {"method": ["wpn", "lm"], "ds_config": "zero2", "micro_batch": 4},
            {"method": ["wpn", "lm"], "ds_config": "zero3", "micro_batch": 8},
            {"method": ["wpn", "lm"], "ds_config": "zero3", "micro_batch": 16, "activation_checkpointing": True},
        ],
    },
    # The paper's time-cost table: every method at every size (6.7B with CPU offload).
    "gpu-sizes": {
        "defaults": {**_GPU, "ds_config": "zero3", "micro_batch": 4},
        "sweeps": [
            {"model": ["opt-125m", "opt-350m", "opt-1.3b"], "method": _EVERY_METHOD},
            {"model": "opt-2.7b", "method": _EVERY_METHOD, "activation_checkpointing": True},
            {"model": "opt-6.7b", "method": _EVERY_METHOD, "ds_config": "zero3_offload",
             "micro_batch": 2, "activation_checkpointing": True, "warmup_steps": 2, "steps": 4,
             "timeout_s": 600},
        ],
    },
    # Steps to the target harmless rate on the implanted toy world (train.py's defaults), for the
    # time-to-unlearn column; runs on CPU or GPU.
    "toy-unlearn": {
        "defaults": {"toy": True, "model": "toy", "steps": 120, "eval_every": 10, "micro_batch": 8,
                     "warmup_steps": 3, "timeout_s": 900},
        "sweeps": [{"method": ["wpn", "sft", "ga", "icu", "npo", "simnpo", "rmu", "rr"]}],
    },
}


# --- reading and expanding -------------------------------------------------------------------

def read_grid(path: str) -> dict:
    if not os.path.isfile(path):
        raise GridError(f"--grid {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            grid = json.loads(text)
        else:
            import yaml
            grid = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise different types
        raise GridError(f"--grid {path}: cannot parse ({str(e).splitlines()[0]})") from None
    if not isinstance(grid, dict):
        raise GridError(f"--grid {path}: must hold a mapping (a sweep, or defaults/sweeps/points)")
    return grid


def expand(grid: dict, source: str = "grid") -> list:
    """Every point of a grid, each a full mapping of POINT_DEFAULTS' fields, in grid order."""
    if not ({"defaults", "sweeps", "points"} & set(grid)):
        grid = {"sweeps": [grid]}  # the whole file is one sweep
    extra = set(grid) - {"defaults", "sweeps", "points"}
    if extra:
        raise GridError(f"{source}: unknown top-level key(s) {', '.join(sorted(extra))} "
                        f"(expected defaults, sweeps, points)")
    defaults = grid.get("defaults") or {}
    _check_fields(defaults, f"{source}: defaults")
    points = []
    for i, sweep in enumerate(grid.get("sweeps") or []):
        where = f"{source}: sweep {i + 1}"
        _check_fields(sweep, where)
        names = list(sweep)
        values = [v if isinstance(v, list) else [v] for v in sweep.values()]
        for combo in itertools.product(*values):
            points.append(complete({**defaults, **dict(zip(names, combo))}))
    for i, point in enumerate(grid.get("points") or []):
        _check_fields(point, f"{source}: point {i + 1}")
        points.append(complete({**defaults, **point}))
    return points


def _check_fields(mapping, where: str) -> None:
    if not isinstance(mapping, dict):
        raise GridError(f"{where}: must be a mapping of field: value")
    unknown = set(mapping) - set(POINT_DEFAULTS)
    if unknown:
        raise GridError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(POINT_DEFAULTS)}")


def complete(point: dict) -> dict:
    """The point with every default filled in; fields that do not apply to a toy run are None."""
    full = {**POINT_DEFAULTS, **point}
    if full["toy"]:
        for name in ("negatives", "seq_len", "prompt_len", "global_negatives", "lengths", "layout", "positive_lm"):
            full[name] = None
    elif full["prompt_len"] is None and isinstance(full["seq_len"], int):
        full["prompt_len"] = full["seq_len"] // 4
    return full


def point_id(point: dict) -> str:
    """The key of a point: a digest of its full config (so a rerun recognises it)."""
    text = json.dumps({k: point[k] for k in sorted(POINT_DEFAULTS)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def label(point: dict) -> str:
    """A short human-readable name of a point (logs, tensorboard run names)."""
    if point["toy"]:
        parts = ["toy"] + ([] if point["model"] == "toy" else [str(point["model"])]) + \
                [str(point["method"]), f"mb{point['micro_batch']}", str(point["ds_config"]), f"w{point['world_size']}"]
    else:
        parts = [str(point["model"]), str(point["method"]), f"K{point['negatives']}", f"mb{point['micro_batch']}",
                 f"T{point['seq_len']}", str(point["ds_config"]), str(point["precision"]), f"w{point['world_size']}"]
        if point["activation_checkpointing"]:
            parts.append("ckpt")
        parts += [p for p, on in (("pku", point["lengths"] == "pku"), ("padded", point["layout"] == "padded"),
                                  ("lm", point["positive_lm"])) if on]
    return "-".join(parts)


def problem(point: dict) -> str | None:
    """Why a point cannot run (checked before launching it), or None."""
    from ...app.models import MODEL_SPECS
    if point["method"] not in method_names():
        return f"method {point['method']!r} is not one of {', '.join(method_names())}"
    if point["toy"]:
        if point["model"] != "toy" and point["model"] not in MODEL_SPECS:
            return f"model {point['model']!r}: a toy point takes 'toy' or a name of wpn_dist.models.MODEL_SPECS"
        if point["method"] == "lm":
            return "method lm does not unlearn: a toy point takes a method that does"
    elif point["model"] not in MODEL_SPECS:
        return f"model {point['model']!r} is not a name of wpn_dist.models.MODEL_SPECS ({', '.join(MODEL_SPECS)})"
    if point["ds_config"] not in DS_CONFIGS:
        return f"ds_config {point['ds_config']!r} is not one of {', '.join(DS_CONFIGS)}"
    if not point["toy"] and point["lengths"] not in LENGTHS:
        return f"lengths {point['lengths']!r} is not one of {', '.join(LENGTHS)}"
    if not point["toy"] and point["layout"] not in LAYOUTS:
        return f"layout {point['layout']!r} is not one of {', '.join(LAYOUTS)}"
    if point["precision"] not in PRECISIONS:
        return f"precision {point['precision']!r} is not one of {', '.join(PRECISIONS)}"
    for name in _POSITIVE_INTS:
        value = point[name]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return f"{name} must be a positive integer, got {value!r}"
    if not isinstance(point["warmup_steps"], int) or point["warmup_steps"] < 0:
        return f"warmup_steps must be an integer >= 0, got {point['warmup_steps']!r}"
    if not point["toy"]:
        if not isinstance(point["prompt_len"], int) or not 1 <= point["prompt_len"] < point["seq_len"]:
            return f"prompt_len must be an integer in [1, seq_len), got {point['prompt_len']!r}"
    return None
