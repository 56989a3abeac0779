"""The scaling study (python -m wpn_dist.scaling) end to end on CPU ranks, through the real deepspeed
launcher: the cpu-tiny preset plus points that must fail, a toy time-to-unlearn point, a rerun, and the
projection; and the formulas on their own."""
import csv
import json
import math
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, cpu_env
from wpn_dist.bench.scaling import study as scaling, grid as scaling_grid, metrics as scaling_metrics, project as scaling_project, report as scaling_report

# Points that must end as failed while the others succeed, and a toy point on the toy world's data with a
# random tiny model (no implant needed; a random model is already "harmless", so it reaches the target
# at its first evaluation: the arithmetic of time to unlearn is what is tested).
EXTRA_GRID = """
points:
  - {model: opt-nonexistent, method: wpn}
  - {model: tiny-opt, method: wpn, seq_len: 1024, prompt_len: 16, steps: 1, warmup_steps: 0}
  - {model: tiny-opt, method: lm, steps: 100000, timeout_s: 3}
  - {toy: true, model: tiny-opt, method: wpn, steps: 4, eval_every: 2, warmup_steps: 1,
     target_harmless_rate: 0.0, timeout_s: 300}
  - {model: tiny-opt, method: wpn, lengths: pku, negatives: 2, positive_lm: true, steps: 2, warmup_steps: 0}
  - {model: tiny-opt, method: wpn, lengths: pku, negatives: 2, positive_lm: true, steps: 2, warmup_steps: 0,
     layout: padded}
"""
# The toy point's model is a random tiny OPT: its answers are degenerate, never meaningfully harmless
# (only an old judge that counted any answer without a harm word called them harmless). The point
# checks the time-to-unlearn plumbing, so its target is met at the first evaluation.
NODES = [1, 2, 4]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The columns: config, step time (median and spread), tokens/s, TFLOP/s, MFU, HFU, peak memory,
# time to unlearn, hardware, library versions.
REQUIRED_COLUMNS = [
    "point_id", "status", "failure", "error_tail", "projected", *scaling_grid.POINT_DEFAULTS,
    "num_params", "tokens_per_step", "reference_tokens_per_step", "step_time_median_s", "step_time_p25_s",
    "step_time_p75_s", "step_time_min_s", "step_time_max_s", "tokens_per_s", "model_flops_per_step",
    "hardware_flops_per_step", "model_tflops_per_gpu", "hardware_tflops_per_gpu", "peak_tflops_per_gpu", "mfu",
    "hfu", "peak_memory_gib", "memory_kind", "steps_to_target", "time_to_unlearn_s", "device_kind",
    "device_name", "cpu_model", "python", "torch", "deepspeed", "transformers",
]


def run_study(out: str, grid: str) -> tuple:
    command = [sys.executable, "-m", "wpn_dist.scaling", "--preset", "cpu-tiny", "--grid", grid, "--out", out,
               "--project", "--nodes", ",".join(map(str, NODES)), "--gpus_per_node", "8"]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, time.time() - started


def read_csv(path: str) -> tuple:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    out, grid = str(root / "study"), str(root / "extra.yaml")
    with open(grid, "w") as f:
        f.write(EXTRA_GRID)
    first_output, _ = run_study(out, grid)
    with open(os.path.join(out, "rows.jsonl")) as f:
        lines_after_first = f.read().splitlines()
    rerun_output, rerun_seconds = run_study(out, grid)
    header, rows = read_csv(os.path.join(out, "results.csv"))
    return {"out": out, "first": first_output, "rerun": rerun_output, "rerun_seconds": rerun_seconds,
            "lines_after_first": lines_after_first, "header": header, "rows": {r["label"]: r for r in rows}}


def preset_labels() -> list:
    return [scaling_grid.label(p) for p in scaling_grid.expand(scaling_grid.PRESETS["cpu-tiny"])]


def test_preset_rows_have_every_column_and_consistent_numbers(study):
    missing = [c for c in REQUIRED_COLUMNS if c not in study["header"]]
    assert not missing, missing
    labels = preset_labels()
    assert len(labels) >= 5 and {"1", "2"} <= {study["rows"][n]["world_size"] for n in labels}
    for name in labels:
        row = study["rows"][name]
        assert row["status"] == "ok", (name, row["error_tail"])
        assert row["projected"] == "False" and row["device_kind"] == "cpu" and row["torch"]
        median, p25, p75 = (float(row[k]) for k in ("step_time_median_s", "step_time_p25_s", "step_time_p75_s"))
        assert 0 < p25 <= median <= p75
        assert int(row["steps_timed"]) == int(row["steps"]) == len(json.loads(row["step_times_s"]))
        # Useful tokens: per example one prompt and 1 + K responses; packed, that is all the forward runs.
        prompt, response = int(row["prompt_len"]), int(row["seq_len"]) - int(row["prompt_len"])
        per_rank = int(row["micro_batch"]) * (prompt + (1 + int(row["negatives"])) * response)
        assert int(row["tokens_per_step"]) == per_rank * int(row["world_size"])
        assert int(row["executed_tokens_per_step"]) == int(row["tokens_per_step"])
        assert float(row["useful_token_fraction"]) == 1.0
        assert math.isclose(float(row["tokens_per_s"]), int(row["tokens_per_step"]) / median, rel_tol=1e-9)
        assert float(row["model_tflops_per_gpu"]) > 0 and float(row["peak_memory_gib"]) > 0
        assert row["mfu"] == "" and row["hfu"] == "" and row["peak_tflops_per_gpu"] == ""  # no CPU peak claimed
        if row["method"] == "lm":  # a random model's first LM loss is near ln(vocabulary)
            assert abs(float(row["loss_first"]) - math.log(int(row["vocab_size"]))) < 0.5
    # WPN against the lm step over the same packed batch (same config apart from the method).
    wpn, lm = study["rows"]["tiny-opt-wpn-K4-mb2-T64-zero3-fp32-w1"], study["rows"]["tiny-opt-lm-K4-mb2-T64-zero3-fp32-w1"]
    assert wpn["tokens_per_step"] == lm["tokens_per_step"]
    assert math.isclose(float(wpn["tokens_per_s_vs_lm"]), float(wpn["tokens_per_s"]) / float(lm["tokens_per_s"]))


def test_padded_layout_executes_padding_and_repeated_prompts(study):
    """PKU-like lengths, the same data in both layouts: the same useful tokens; the padded forward runs
    more (padding, the prompt once per row), and the packed row carries the ratios against it."""
    packed = study["rows"]["tiny-opt-wpn-K2-mb2-T128-zero3-fp32-w1-pku-lm"]
    padded = study["rows"]["tiny-opt-wpn-K2-mb2-T128-zero3-fp32-w1-pku-padded-lm"]
    for row in (packed, padded):
        assert row["status"] == "ok", row["error_tail"]
    assert packed["tokens_per_step"] == padded["tokens_per_step"] == packed["executed_tokens_per_step"]
    assert int(padded["executed_tokens_per_step"]) > int(padded["tokens_per_step"])
    assert float(padded["useful_token_fraction"]) < 0.9 and float(packed["useful_token_fraction"]) == 1.0
    assert math.isclose(float(packed["step_time_vs_padded"]),
                        float(padded["step_time_median_s"]) / float(packed["step_time_median_s"]))
    assert float(packed["peak_memory_vs_padded"]) > 0


def test_failed_points_are_recorded_and_the_sweep_goes_on(study):
    rows = list(study["rows"].values())
    by_failure = {r["failure"]: r for r in rows if r["status"] == "failed"}
    assert set(by_failure) == {"invalid", "error", "timeout"}
    assert "opt-nonexistent" in by_failure["invalid"]["error_tail"]
    assert "positions" in by_failure["error"]["error_tail"]  # seq_len 1024 > tiny-opt's 512, raised by the worker
    assert by_failure["timeout"]["log"] and os.path.isfile(by_failure["timeout"]["log"])
    assert all(r["python"] and r["torch"] for r in rows)  # failed rows still say where they ran


def test_rerun_skips_points_already_done(study):
    with open(os.path.join(study["out"], "rows.jsonl")) as f:
        assert f.read().splitlines() == study["lines_after_first"]
    total = len(preset_labels()) + len(EXTRA_GRID.split("- {")) - 1
    assert study["rerun"].count("skipped") == total
    assert study["rerun_seconds"] < 90  # no launch: only the outputs are rebuilt


def test_toy_point_gives_time_to_unlearn(study):
    toy = next(r for r in study["rows"].values() if r["toy"] == "True")
    assert toy["status"] == "ok", toy["error_tail"]
    assert int(toy["steps_to_target"]) == 2  # the first evaluation (eval_every 2) meets the target of 0
    assert math.isclose(float(toy["time_to_unlearn_s"]), 2 * float(toy["step_time_median_s"]), rel_tol=1e-9)
    # Measured wpn rows borrow the toy run's step count, marked as an estimate.
    wpn = study["rows"][preset_labels()[0]]
    assert wpn["method"] == "wpn" and int(wpn["steps_to_target"]) == 2
    assert "estimate" in wpn["time_to_unlearn_source"]


def test_plots_and_tensorboard_exist(study):
    for name in ("vs_model_size.png", "vs_negatives.png", "memory_vs_stage.png"):
        with open(os.path.join(study["out"], name), "rb") as f:
            assert f.read(8) == PNG_MAGIC, name
    runs = os.listdir(os.path.join(study["out"], "tensorboard"))
    assert any(r.startswith("tiny-opt-wpn") for r in runs) and any(r.startswith("projection-") for r in runs)
    for run in runs:
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(study["out"], "tensorboard", run)))


def test_projection_rows_are_marked_and_communication_grows_with_nodes(study):
    header, rows = read_csv(os.path.join(study["out"], "projected.csv"))
    assert rows and all(r["projected"] == "True" for r in rows)
    sources = {}
    for r in rows:
        sources.setdefault(r["source_point_id"], []).append(r)
    # every measured row (the preset's and the two PKU-length points), no failed or toy row
    assert len(sources) == len(preset_labels()) + 2
    for members in sources.values():
        members.sort(key=lambda r: int(r["nodes"]))
        assert [int(r["nodes"]) for r in members] == NODES
        comm = [float(r["comm_time_s"]) for r in members]
        assert comm[0] > 0 and all(a < b for a, b in zip(comm, comm[1:])), comm
        for r in members:  # not overlapped by default: step = compute + communication
            assert math.isclose(float(r["step_time_s"]), float(r["compute_time_s"]) + float(r["comm_time_s"]))


# --- the pieces, without launching anything ----------------------------------------------------

def test_grid_expansion_and_unknown_fields(tmp_path):
    points = scaling_grid.expand({"defaults": {"seq_len": 32}, "sweeps": [{"method": ["wpn", "lm"], "negatives": [1, 2]}],
                                  "points": [{"model": "tiny-gpt-neo"}]})
    assert len(points) == 5 and all(p["seq_len"] == 32 and p["prompt_len"] == 8 for p in points)
    assert len({scaling_grid.point_id(p) for p in points}) == 5
    assert scaling.select(points, ["method=lm", "negatives=2"]) == [points[3]]
    with pytest.raises(scaling_grid.GridError, match="unknown field"):
        scaling_grid.expand({"sweeps": [{"modle": "tiny-opt"}]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny-opt\nbatch: 3\n")
    result = subprocess.run([sys.executable, "-m", "wpn_dist.scaling", "--grid", str(bad), "--out", str(tmp_path / "o")],
                            cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown field" in result.stderr and not (tmp_path / "o").exists()
    for preset in scaling_grid.PRESETS.values():  # every preset point is runnable as far as can be checked here
        assert all(scaling_grid.problem(p) is None for p in scaling_grid.expand(preset))


def test_flops_and_utilisation_formulas():
    row = {"num_params": 1_315_758_080, "num_layers": 24, "hidden_size": 2048, "seq_len": 512, "world_size": 1,
           "tokens_per_step": 46_500, "reference_tokens_per_step": 0, "step_time_median_s": 1.0,
           "activation_checkpointing": True, "precision": "bf16", "device_kind": "cuda",
           "device_name": "NVIDIA H100 80GB HBM3"}
    out = scaling_metrics.flops_columns(row)
    per_token = 6 * row["num_params"] + 12 * 24 * 2048 * 512
    assert math.isclose(out["model_flops_per_step"], 46_500 * per_token)
    assert math.isclose(out["mfu"], 0.385, abs_tol=0.001)  # the plain lm reference of ../shared/gpu/README.md
    assert math.isclose(out["hardware_flops_per_step"], out["model_flops_per_step"] * 4 / 3)  # + one forward (8N)
    assert scaling_metrics.flops_columns({**row, "device_kind": "cpu"})["mfu"] is None
    assert scaling_metrics.flops_columns({**row, "precision": "fp32"})["mfu"] is None
    assert scaling_metrics.peak_flops("NVIDIA H200", "bf16") == 989e12
    assert scaling_metrics.peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    stats = scaling_metrics.step_time_stats([3.0, 1.0, 2.0, 10.0])
    assert stats["step_time_median_s"] == 2.5 and stats["step_time_min_s"] == 1.0 and stats["step_time_max_s"] == 10.0


def test_communication_model():
    row = {"num_params": 1_000_000_000, "num_layers": 24, "hidden_size": 2048, "precision": "bf16", "zero_stage": 3,
           "method": "wpn", "global_negatives": True, "negatives": 3, "reference_tokens_per_step": 0}
    comm = scaling_project.communication(row, 16, 4, 25e9, 0.0, 5e7)
    f = 15 / 16
    assert math.isclose(comm["param_comm_bytes_per_gpu"], 3 * f * 1e9 * 2)
    assert math.isclose(comm["negatives_comm_bytes_per_gpu"], 3 * f * (16 * 4 * 3) * 2048 * 4)
    assert math.isclose(comm["comm_time_s"], (comm["param_comm_bytes_per_gpu"] + comm["negatives_comm_bytes_per_gpu"]) / 25e9)
    assert scaling_project.communication(row, 1, 4, 25e9, 5e-6, 5e7)["comm_time_s"] == 0
    stage2 = scaling_project.communication({**row, "zero_stage": 2, "method": "lm"}, 16, 4, 25e9, 0.0, 5e7)
    assert math.isclose(stage2["param_comm_bytes_per_gpu"], 2 * f * 1e9 * 2)
    measured = {**row, "status": "ok", "toy": False, "point_id": "x", "label": "x", "world_size": 1, "micro_batch": 4,
                "tokens_per_step": 8192, "step_time_median_s": 1.0, "mfu": 0.4, "model": "m", "seq_len": 512}
    overlapped = scaling_project.project([measured], [2], 8, 200, 5, overlap=True)[0]
    assert overlapped["step_time_s"] == max(overlapped["compute_time_s"], overlapped["comm_time_s"])
    strong = scaling_project.project([measured], [1, 2], 8, 200, 5, global_batch=64)
    assert [r["per_gpu_micro_batch"] for r in strong] == [8, 4] and strong[1]["compute_time_s"] == 1.0


def test_toy_metrics_parsing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "step_time(s)": t, "throughput(tokens/s)": 100.0 / t, "memory/rss(GiB)": 0.5}
             for s, t in [(1, 9.0), (2, 1.0), (3, 2.0), (4, 3.0)]]
    lines.insert(2, {"step": 2, "eval/harmless_rate": 0.5})
    lines.append({"step": 4, "eval/harmless_rate": 0.97})
    path.write_text("\n".join(json.dumps(x) for x in lines))
    point = {"warmup_steps": 1, "target_harmless_rate": 0.958, "steps": 4, "world_size": 1}
    numbers = scaling.toy_numbers(str(path), point)
    assert numbers["step_time_median_s"] == 2.0 and numbers["steps_to_target"] == 4
    assert numbers["time_to_unlearn_s"] == 8.0 and numbers["final_harmless_rate"] == 0.97
    never = scaling.toy_numbers(str(path), {**point, "target_harmless_rate": 0.99})
    assert never["steps_to_target"] is None and "not reached" in never["time_to_unlearn_source"]


def test_time_budget_leaves_points_for_the_next_run(tmp_path, monkeypatch):
    """A point still running when the budget is spent is stopped and not recorded; later ones do not start."""
    monkeypatch.setattr(scaling, "MIN_POINT_S", 0)
    slow = [scaling_grid.complete({"model": "tiny-opt", "steps": 100000, "seed": s}) for s in (0, 1)]
    started = time.time()
    counts = scaling.sweep(slow, str(tmp_path), time_budget_s=2, log=lambda *_: None)
    assert counts["left"] == 2 and counts["run"] == 0 and time.time() - started < 40
    assert not (tmp_path / "rows.jsonl").exists()


def test_estimates_use_the_toy_steps_of_the_same_method():
    rows = [{"toy": True, "status": "ok", "method": "ga", "steps_to_target": 30},
            {"toy": False, "status": "ok", "method": "ga", "step_time_median_s": 0.5},
            {"toy": False, "status": "ok", "method": "lm", "step_time_median_s": 0.5}]
    out = scaling_report.with_estimates(rows)
    assert out[1]["time_to_unlearn_s"] == 15.0 and "time_to_unlearn_s" not in out[2]
    same = {**scaling_grid.complete({}), "status": "ok"}
    ratio = scaling_report.with_lm_ratio([{**same, "method": "wpn", "tokens_per_s": 90.0},
                                          {**same, "method": "lm", "tokens_per_s": 100.0},
                                          {**same, "method": "wpn", "negatives": 1, "tokens_per_s": 50.0}])
    assert ratio[0]["tokens_per_s_vs_lm"] == 0.9 and "tokens_per_s_vs_lm" not in ratio[2]
