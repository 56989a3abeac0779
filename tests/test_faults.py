"""The fault matrix, on 2 CPU ranks: however a save dies, the run continues
from a complete checkpoint and loses nothing that was complete. Each case interrupts the 8-step run of
test_checkpoint (saves at steps 3, 6, 8) during the save of step 6, resumes with --resume auto, and
compares every later step's loss with the uninterrupted run."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, cpu_env, free_port, run_ranks
from test_checkpoint import ARGS, fault, losses
from wpn_dist.app import checkpoint


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "uninterrupted"
    run_ranks(ARGS + ["--output_dir", str(run)])
    return run


def resume_and_compare(run, uninterrupted, resumed_at: int) -> None:
    result = run_ranks(ARGS + ["--output_dir", str(run), "--resume", "auto"])
    assert f"at step {resumed_at}" in result.stdout
    want, got = losses(uninterrupted), losses(run)
    for step in range(resumed_at + 1, 9):
        assert got[step] == pytest.approx(want[step], abs=1e-6, rel=1e-6), step
    assert json.loads((run / "summary.json").read_text())["steps_run"] == 8


@pytest.mark.parametrize("phase,survivor", [("shards_written", 3), ("manifest_written", 3), ("renamed", 6)])
def test_sigkill_of_one_rank_during_a_save(phase, survivor, uninterrupted, tmp_path):
    run = tmp_path / phase
    result = run_ranks(ARGS + ["--output_dir", str(run)], check=False, **fault(f"kill_at_{phase}:6"))
    assert result.returncode != 0
    newest = checkpoint.newest_complete(str(run), log=lambda m: None)
    assert newest.endswith(f"step{survivor:08d}") and checkpoint.problem_with(newest) is None
    latest = open(os.path.join(checkpoint.checkpoint_root(str(run)), "latest")).read()
    assert checkpoint.problem_with(os.path.join(checkpoint.checkpoint_root(str(run)), latest)) is None
    resume_and_compare(run, uninterrupted, survivor)
    # The dead save left nothing behind once the next save pruned.
    assert not [t for t in os.listdir(checkpoint.checkpoint_root(str(run))) if t.startswith("step") and "." in t]


def test_full_disk_during_a_save(uninterrupted, tmp_path):
    run = tmp_path / "enospc"
    result = run_ranks(ARGS + ["--output_dir", str(run)], check=False, **fault("enospc_in_save:6"))
    assert result.returncode != 0 and "No space left on device" in result.stdout + result.stderr
    assert checkpoint.newest_complete(str(run), log=lambda m: None).endswith("step00000003")
    resume_and_compare(run, uninterrupted, 3)


def test_sigterm_during_a_save_finishes_it_then_stops_at_the_next_step(uninterrupted, tmp_path):
    run = tmp_path / "sigterm"
    result = run_ranks(ARGS + ["--output_dir", str(run)], check=False, **fault("sigterm_in_save:6"))
    assert "exiting with status 99" in result.stdout, result.stdout[-2000:]
    assert checkpoint.newest_complete(str(run)).endswith("step00000007")
    resume_and_compare(run, uninterrupted, 7)


def test_no_save_is_started_that_cannot_finish_before_the_kill(uninterrupted, tmp_path):
    run = tmp_path / "no_time"
    result = run_ranks(ARGS + ["--output_dir", str(run)], check=False, WPN_DIST_KILL_WAIT_S="0",
                           **fault("sigterm_in_save:6"))
    assert "not saving; the run continues from" in result.stdout and "exiting with status 99" in result.stdout
    root = checkpoint.checkpoint_root(str(run))
    assert open(os.path.join(root, "latest")).read() == "step00000006"
    assert checkpoint.newest_complete(str(run)).endswith("step00000006")
    resume_and_compare(run, uninterrupted, 6)


@pytest.mark.parametrize("damage", ["corrupt manifest", "missing shard"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(damage, uninterrupted, tmp_path):
    run = tmp_path / "damaged"
    shutil.copytree(uninterrupted, run)
    (run / "summary.json").unlink()
    newest = os.path.join(checkpoint.checkpoint_root(str(run)), "step00000008")
    if damage == "corrupt manifest":
        with open(os.path.join(newest, checkpoint.MANIFEST), "w") as f:
            f.write('{"files": {"trunc')
    else:
        shard = next(os.path.join(d, f) for d, _, fs in os.walk(newest) for f in fs if "optim_states" in f)
        os.remove(shard)
    messages = []
    assert checkpoint.newest_complete(str(run), log=messages.append).endswith("step00000006")
    assert ("corrupt" if damage == "corrupt manifest" else "missing file") in messages[0]
    resume_and_compare(run, uninterrupted, 6)


def test_a_second_job_on_the_same_directory_refuses(tmp_path):
    run = tmp_path / "shared"
    release = tmp_path / "release"  # the first job holds its lock after step 1 until this file exists
    env = cpu_env(WPN_DIST_HOOKS="fault_hooks:RecordingHooks", WPN_DIST_RECORD=str(tmp_path / "l{rank}.jsonl"),
                  WPN_DIST_WAIT_FOR=str(release), PYTHONPATH=REPO + os.pathsep + os.path.join(REPO, "tests"))
    first = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
                              str(free_port())] + ARGS + ["--output_dir", str(run)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (run / ".lock").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        holder = json.loads((run / ".lock").read_text())
        assert {"host", "pid"} <= set(holder)
        second = run_ranks(ARGS + ["--output_dir", str(run), "--resume", "auto"], num_procs=1, check=False)
        assert second.returncode == 2
        assert f"is in use by another run (host {holder['host']} pid {holder['pid']}" in second.stderr
    finally:
        release.write_text("go")
        output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output[-3000:]
    assert not (run / ".lock").exists()  # released at the end
