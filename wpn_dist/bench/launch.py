"""Running a job on this machine's ranks through the ``deepspeed`` launcher, from a driver process
(the toy benchmark, the scaling study): the command line, and a run with its output in a log that
never leaves ranks behind."""
import os
import signal
import subprocess
import sys

from ..app.distributed import free_port, on_cpu

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launcher(world_size: int) -> list:
    """The launcher's command line for ``world_size`` local ranks; append the script and its options."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world_size),
            "--master_port", str(free_port())]


def _end_session(proc: subprocess.Popen) -> None:
    """Stop the launcher and the ranks it started (they share its session): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def launch(command: list, log_path: str, timeout_s: float | None = None) -> tuple:
    """Run ``command`` from the checkout in its own session with output to ``log_path``; on timeout, or
    when this process is interrupted or terminated, end that session. Returns (exit code, timed out)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # One thread per rank unless the user says otherwise: ranks share the cores, and numbers that
    # depend on the thread count would differ between machines.
    env.setdefault("OMP_NUM_THREADS", "1")
    if on_cpu():
        env["DS_ACCELERATOR"] = "cpu"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            _end_session(proc)
            return proc.returncode, True
        except BaseException:  # Ctrl-C, or SIGTERM turned into SystemExit: leave no rank behind
            _end_session(proc)
            raise
