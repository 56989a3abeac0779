"""Checkpoints under ZeRO-3 on 2 CPU ranks: exact resume, crash-safe saves, truncated shards,
non-finite losses."""
import json
import os

import pytest

from conftest import REPO, run_ranks
from wpn_dist.app import checkpoint


def fault(spec: str) -> dict:
    """Environment that installs tests/fault_hooks.py into the run and names the fault and its step."""
    tests_dir = os.path.join(REPO, "tests")
    return {"WPN_DIST_HOOKS": "fault_hooks:FaultHooks", "WPN_DIST_FAULT": spec,
            "PYTHONPATH": REPO + os.pathsep + tests_dir}

ARGS = ["wpn_dist/train.py", "--model", "tiny-opt", "--model_init", "random",
        "--data", os.path.join(REPO, "tests", "data", "tiny.jsonl"), "--steps", "8", "--micro_batch_size", "2",
        "--lr", "1e-3", "--log_every", "1", "--save_every", "3", "--export_hf", "false"]


def losses(run_dir) -> dict:
    """step -> logged loss; a step logged twice (before a crash and after the resume) keeps the last."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss/total"] for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt") / "uninterrupted"
    run_ranks(ARGS + ["--output_dir", str(run)])
    return run


def test_resume_after_a_crash_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    run = tmp_path / "crashed"
    crashed = run_ranks(ARGS + ["--output_dir", str(run)], check=False, **fault("exit_after_step:5"))
    assert crashed.returncode != 0
    assert checkpoint.newest_complete(str(run)).endswith("step00000003")
    resumed = run_ranks(ARGS + ["--output_dir", str(run), "--resume", "auto"])
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    want, got = losses(uninterrupted), losses(run)
    assert sorted(got) == list(range(1, 9))
    for step in range(4, 9):
        assert got[step] == pytest.approx(want[step], abs=1e-6, rel=1e-6), step
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["first_step"], summary["world_size"]) == (4, 2)


def test_crash_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "crash_in_save"
    result = run_ranks(ARGS + ["--output_dir", str(run)], check=False, **fault("crash_in_save:6"))
    assert result.returncode != 0
    root = checkpoint.checkpoint_root(str(run))
    assert open(os.path.join(root, "latest")).read() == "step00000003"
    assert not os.path.exists(os.path.join(root, "step00000006"))  # the save died in its .partial directory
    assert "no manifest" in checkpoint.problem_with(os.path.join(root, "step00000006.partial"))
    assert checkpoint.newest_complete(str(run), log=lambda m: None).endswith("step00000003")


def test_truncated_shard_is_detected_and_the_previous_checkpoint_used(uninterrupted, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    root = checkpoint.checkpoint_root(str(run))
    assert sorted(t for t in os.listdir(root) if t.startswith("step")) == ["step00000006", "step00000008"]
    newest = os.path.join(root, "step00000008")
    shard = next(os.path.join(d, f) for d, _, fs in os.walk(newest) for f in fs if "optim_states" in f)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    messages = []
    assert checkpoint.newest_complete(str(run), log=messages.append).endswith("step00000006")
    assert "truncated" in messages[0] and os.path.basename(shard) in messages[0]
    # Naming the broken checkpoint explicitly is a clear error.
    result = run_ranks(ARGS + ["--output_dir", str(run), "--resume", newest], check=False)
    assert result.returncode != 0 and "truncated" in result.stderr


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "nan"
    result = run_ranks(ARGS + ["--output_dir", str(run)], check=False, **fault("nan_at_step:5"))
    assert result.returncode != 0
    good = os.path.join(checkpoint.checkpoint_root(str(run)), "step00000003")
    assert f"non-finite loss at step 5; the last good checkpoint is {good}" in result.stderr
    assert checkpoint.problem_with(good) is None


def test_stop_signal_on_one_rank_checkpoints_and_resumes_exactly(uninterrupted, tmp_path):
    run = tmp_path / "signalled"
    stopped = run_ranks(ARGS + ["--output_dir", str(run)], check=False, **fault("usr1_last_rank_at_step:4"))
    assert stopped.returncode != 0 and "exiting with status 99" in stopped.stdout
    assert checkpoint.newest_complete(str(run)).endswith("step00000004")
    run_ranks(ARGS + ["--output_dir", str(run), "--resume", "auto"])
    want, got = losses(uninterrupted), losses(run)
    for step in range(5, 9):
        assert got[step] == pytest.approx(want[step], abs=1e-6, rel=1e-6), step
