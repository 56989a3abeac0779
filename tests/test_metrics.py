"""What the trainer logs: each term's mean over the accumulation window (not the last micro-batch's),
and step time and throughput measured over the steps alone (time spent after a step, in evaluation or
a checkpoint, is not charged to the next window)."""
import json
import os

import pytest

from conftest import REPO, run_ranks


def test_logged_loss_is_the_window_mean_and_step_time_excludes_pauses(tmp_path):
    run = tmp_path / "run"
    env = {"WPN_DIST_HOOKS": "fault_hooks:RecordingHooks", "WPN_DIST_RECORD": str(tmp_path / "losses{rank}.jsonl"),
           "WPN_DIST_PAUSE_S": "1.5", "PYTHONPATH": REPO + os.pathsep + os.path.join(REPO, "tests")}
    run_ranks(["wpn_dist/train.py", "--model", "tiny-opt", "--model_init", "random",
                   "--data", os.path.join(REPO, "tests", "data", "tiny.jsonl"), "--steps", "4",
                   "--micro_batch_size", "1", "--gradient_accumulation_steps", "2", "--lr", "1e-3",
                   "--log_every", "2", "--save_every", "1", "--export_hf", "false", "--output_dir", str(run)],
                  num_procs=1, **env)
    micro = [json.loads(line) for line in open(tmp_path / "losses0.jsonl")]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        # One rank: the logged total is the mean over the logged step's 2 micro-batches.
        last_step = [m["loss"] for m in micro if m["step"] == row["step"]]
        assert len(last_step) == 2
        assert row["loss/total"] == pytest.approx(sum(last_step) / 2, rel=1e-5)
        # Each step took far less than the 1.5 s pause that followed it (plus a checkpoint).
        assert row["step_time(s)"] < 1.0, row
