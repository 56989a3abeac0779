import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests run on the machine's own CPU kernels, in this process and in every command and rank it
# starts (WPN_DIST_NATIVE_KERNELS=1, before anything computes: the session's implant is then the one
# the toy commands make). The toy world's fixed kernels (wpn_dist/app/kernels.py) are there to give the
# committed tables' numbers, which no test recomputes, and MKL's fixed code path doubles the time of
# every toy-world run; test_toy_determinism checks the pinning itself.
from wpn_dist.app import kernels  # noqa: E402

os.environ.setdefault(kernels.NATIVE, "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wpn_options(**options):
    """WPN's options with both sides of the N-pair term trained (``frozen_side="none"``): for the tests
    that read a term's value with no frozen original model to pool the candidates from."""
    from wpn_dist.core.methods import method_class
    return method_class("wpn").Options(**{"frozen_side": "none", **options})


def cpu_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """One toy-model cache for the whole test session (the implant runs at most once)."""
    return os.environ.get("WPN_DIST_CACHE") or str(tmp_path_factory.mktemp("wpn_cache"))


def run_ranks(script_and_args: list, num_procs: int = 2, timeout: int = 600, check: bool = True,
              **env) -> subprocess.CompletedProcess:
    """Start NUM_PROCS ranks of a script on this machine directly, with the variables a launcher sets
    (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), for the tests of what ranks
    compute. It skips the deepspeed launcher's two processes, which import deepspeed and torch before a
    rank starts (about 7 s a launch on 2 cores); the launcher itself runs in the main job's and the
    launchers' tests (run_deepspeed) and under Slurm. As the launcher does, it stops the other ranks
    when one fails (after 3 s, in which they may end on their own). Returns the ranks' output, rank
    0's first; unless check=False, fails the test with it when a rank fails."""
    import tempfile
    import time
    port = str(free_port())
    command = [sys.executable] + (["-m"] + script_and_args[1:] if script_and_args[0] == "--module" else script_and_args)
    with tempfile.TemporaryDirectory() as logs:
        logs_of = [(os.path.join(logs, f"{rank}.out"), os.path.join(logs, f"{rank}.err")) for rank in range(num_procs)]
        ranks = []
        for rank, (out, err) in enumerate(logs_of):
            rank_env = cpu_env(**env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(num_procs),
                               LOCAL_WORLD_SIZE=str(num_procs), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            with open(out, "w") as stdout, open(err, "w") as stderr:
                ranks.append(subprocess.Popen(command, cwd=REPO, env=rank_env, stdout=stdout, stderr=stderr))
        deadline, kill_at = time.monotonic() + timeout, None
        while any(p.poll() is None for p in ranks):
            if kill_at is None and any(p.returncode for p in ranks):
                kill_at = time.monotonic() + 3  # the others may be on their way out too: a moment to finish
            if time.monotonic() > min(deadline, kill_at or deadline):
                break
            time.sleep(0.1)
        timed_out = not any(p.returncode for p in ranks) and any(p.returncode is None for p in ranks)
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.wait()
        if timed_out:
            raise subprocess.TimeoutExpired(script_and_args, timeout)
        texts = [(open(out).read(), open(err).read()) for out, err in logs_of]
    codes = [p.returncode for p in ranks]
    returncode = next((c for c in codes if c != 0), 0)
    result = subprocess.CompletedProcess(script_and_args, returncode, "".join(o for o, _ in texts),
                                         "".join(e for _, e in texts))
    if check and returncode != 0:
        pytest.fail(f"ranks exited {codes}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def run_deepspeed(script_and_args: list, num_procs: int = 2, timeout: int = 600, check: bool = True,
                  **env) -> subprocess.CompletedProcess:
    """Run the real `deepspeed` launcher on CPU ranks; unless check=False, fail the test with its output
    if it fails."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs),
               "--master_port", str(free_port())] + script_and_args
    result = subprocess.run(command, cwd=REPO, env=cpu_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"deepspeed exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def implanted_toy_model(toy_cache):
    """The toy world's implanted model (seed 0), made once and cached; returns its directory."""
    from wpn_dist.app import toy_world as toy
    previous = os.environ.get("WPN_DIST_CACHE")
    os.environ["WPN_DIST_CACHE"] = toy_cache
    try:
        world = toy.make_world(toy.ToyWorldConfig(seed=0))
        return toy.implant(world, toy.ImplantConfig(), toy.implant_dir(world.config, toy.ImplantConfig()))
    finally:
        if previous is None:
            del os.environ["WPN_DIST_CACHE"]
        else:
            os.environ["WPN_DIST_CACHE"] = previous
