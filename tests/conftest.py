import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The toy world's fixed CPU kernels (wpn_dist/app/kernels.py), for this process and every rank it
# starts, set before anything computes: the session's implant is then the one the commands make.
from wpn_dist.app import kernels  # noqa: E402

if kernels.has_avx2():
    for name, value in kernels.PINNED.items():
        os.environ.setdefault(name, value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """One toy-model cache for the whole test session (the implant runs at most once)."""
    return os.environ.get("WPN_DIST_CACHE") or str(tmp_path_factory.mktemp("wpn_cache"))


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
