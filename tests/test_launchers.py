"""The trainer under each launcher: deepspeed (tests/test_zero3.py and others), srun (tests/test_slurm.py),
torchrun and accelerate launch (here, on CPU ranks); a launch whose world size is not the launcher's
request is refused with one line; OMP_NUM_THREADS's per-rank default; the GPU of a rank."""
import os
import subprocess
import sys

import pytest

from conftest import REPO, cpu_env, free_port
from wpn_dist.app import distributed

TRAIN = os.path.join(REPO, "wpn_dist", "train.py")
ACCELERATE_CONFIG = os.path.join(REPO, "ds_configs", "accelerate_zero3.yaml")


def short_run(out_dir) -> list:
    return ["--model", "tiny-opt", "--model_init", "random", "--data", os.path.join(REPO, "tests", "data", "tiny.jsonl"),
            "--micro_batch_size", "2", "--steps", "2", "--evaluate", "false",
            "--export_hf", "false", "--output_dir", str(out_dir)]


def launch(command, tmp_path, **env):
    # No accelerate default config of the user's (HF_HOME/accelerate/default_config.yaml) applies.
    env = cpu_env(HF_HOME=str(tmp_path / "hf"), **env)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def wpn_errors(result) -> list:
    return [line for line in result.stderr.splitlines() if line.startswith("wpn_dist: error:")]


# --- the launchers, for real -------------------------------------------------------------------------

def test_torchrun_two_ranks(tmp_path):
    out = tmp_path / "run"
    result = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     str(free_port()), TRAIN] + short_run(out), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size 2" in result.stdout and (out / "summary.json").is_file(), result.stdout[-3000:]


def test_accelerate_launch_with_the_shipped_config(tmp_path):
    out = tmp_path / "run"
    result = launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIG,
                     "--num_processes", "2", "--main_process_port", str(free_port()), TRAIN]
                    + short_run(out), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size 2" in result.stdout and (out / "summary.json").is_file(), result.stdout[-3000:]


def test_accelerate_launch_that_starts_one_process_is_refused(tmp_path):
    # Without a DeepSpeed/multi-GPU config, on a machine without GPUs, accelerate's plain launcher starts
    # ONE process for --num_processes 2: it must not train alone as a world of 1.
    out = tmp_path / "run"
    result = launch([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--quiet",
                     TRAIN] + short_run(out), tmp_path)
    assert result.returncode != 0
    errors = wpn_errors(result)
    assert len(errors) == 1 and "accelerate launch was asked for 2 processes but started this one alone" in errors[0], \
        result.stderr[-3000:]
    assert "accelerate_zero3.yaml" in errors[0]
    assert not out.exists() and "world size" not in result.stdout


# --- the launch check, as a function -----------------------------------------------------------------

ACCELERATE_PLAIN = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}
TORCHRUN = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}
ACCELERATE = ["/usr/bin/python3", "/usr/bin/accelerate", "launch"]


@pytest.mark.parametrize("env,parent,expected", [
    # accelerate's plain launcher: one process, MASTER_* set because more were asked for
    ({**ACCELERATE_PLAIN, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     ACCELERATE + ["--num_processes", "2", "train.py", "--num_processes", "7"], "asked for 2 processes but started"),
    ({**ACCELERATE_PLAIN, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     ACCELERATE + ["--num-processes=4", "train.py"], "asked for 4 processes"),
    ({**ACCELERATE_PLAIN, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},  # from a default config: count unknown
     ACCELERATE + ["train.py"], "asked for several processes"),
    ({**ACCELERATE_PLAIN, "MASTER_PORT": "29500"}, None, "asked for several processes"),  # parent unreadable
    (ACCELERATE_PLAIN, ACCELERATE + ["--num_processes", "1", "train.py"], None),  # one process asked, one started
    ({**ACCELERATE_PLAIN, "MASTER_PORT": "1234"}, ACCELERATE + ["--num_processes", "1", "train.py"], None),
    ({**ACCELERATE_PLAIN, "MASTER_PORT": "1234"}, ["python", "driver.py"], None),  # a process accelerate's child started
    # accelerate + DeepSpeed plugin (torchrun underneath)
    ({**TORCHRUN, "ACCELERATE_USE_DEEPSPEED": "true"}, ACCELERATE + ["--num_processes", "2", "train.py"], None),
    ({**TORCHRUN, "ACCELERATE_USE_DEEPSPEED": "true"}, ACCELERATE + ["--num_processes", "3", "--num_machines", "1",
                                                                    "train.py"], "asked for 3 processes but the world has 2"),
    # torchrun, the deepspeed launcher, srun, plain python
    (TORCHRUN, ["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py"], None),
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "CROSS_SIZE": "1"},
     ["python", "-m", "deepspeed.launcher.launch"], None),
    ({"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NTASKS": "8"}, ["slurmstepd: [1.0]"], None),
    ({}, ["bash"], None),
    # MPI without RANK/WORLD_SIZE: each process would be alone
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"}, ["mpirun"], "started by MPI (OMPI_COMM_WORLD_SIZE=4)"),
    ({"PMI_SIZE": "1"}, ["mpirun"], None),
    ({**TORCHRUN, "RANK": "2"}, ["torchrun"], "RANK=2 is outside WORLD_SIZE=2"),
])
def test_launch_problem(env, parent, expected):
    problem = distributed.launch_problem(env, parent)
    if expected is None:
        assert problem is None, problem
    else:
        assert problem is not None and expected in problem and "\n" not in problem, problem


def test_accelerate_num_processes_from_its_config_file(tmp_path):
    config = tmp_path / "a.yaml"
    config.write_text("distributed_type: NO\nnum_processes: 3\n")
    assert distributed.accelerate_num_processes(["--config_file", str(config), "train.py"]) == 3
    assert distributed.accelerate_num_processes([f"--config-file={config}", "--num_processes", "5", "t.py"]) == 5
    assert distributed.accelerate_num_processes(["--config_file", ACCELERATE_CONFIG, "t.py"]) is None  # -1: must be given
    assert distributed.accelerate_num_processes(["t.py", "--num_processes", "2"]) is None  # the script's own option


# --- ranks per node, threads, GPUs -------------------------------------------------------------------

@pytest.mark.parametrize("env,expected", [
    ({"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}, 4),  # torchrun
    ({"LOCAL_SIZE": "2", "WORLD_SIZE": "16"}, 2),  # the deepspeed launcher
    ({"SLURM_PROCID": "5", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS": "8"}, 4),
    ({"SLURM_PROCID": "8", "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "4(x2),1", "SLURM_NTASKS": "9"}, 1),
    ({"SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "8"}, 2),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS_PER_NODE": "3", "SLURM_NTASKS": "6"}, 3),
    ({"WORLD_SIZE": "3"}, 3),  # no per-node count: one node
    ({}, 1),
])
def test_local_world_size(env, expected):
    assert distributed.env_local_world_size(env) == expected


THREADS_SCRIPT = """
import json, os, sys, torch
from wpn_dist.app import distributed
first = distributed.default_threads()  # this process's own (fake) launcher environment
results = [first, torch.get_num_threads()]
for fake in json.loads(sys.argv[1]):  # other environments, in the same process
    results += [distributed.default_threads(fake), torch.get_num_threads()]
print("RESULT", json.dumps(results))
"""


def test_omp_num_threads_default_per_rank(tmp_path):
    usable = len(os.sched_getaffinity(0))
    fakes = [{"LOCAL_WORLD_SIZE": "1", "RANK": "1"}, {"LOCAL_WORLD_SIZE": "64", "RANK": "1"},
             {"SLURM_PROCID": "1", "SLURM_CPUS_PER_TASK": "1", "SLURM_TASKS_PER_NODE": "1"}]
    import json
    env = cpu_env(LOCAL_WORLD_SIZE="2", RANK="0", WORLD_SIZE="2")
    del env["OMP_NUM_THREADS"]  # as the deepspeed launcher and srun leave it
    result = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, json.dumps(fakes)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    values = json.loads(result.stdout.split("RESULT", 1)[1])
    half = max(1, usable // 2)
    assert values == [half, half, usable, usable, 1, 1, 1, 1], (usable, values)
    said = [line for line in result.stdout.splitlines() if "OMP_NUM_THREADS is unset" in line]
    assert said == [f"wpn_dist: OMP_NUM_THREADS is unset: {half} thread{'s' if half > 1 else ''} per rank "
                    f"({usable} usable CPUs / 2 ranks on this node); set OMP_NUM_THREADS to choose"], result.stdout
    # Set: left as it is, and nothing said.
    env["OMP_NUM_THREADS"] = "1"
    env["LOCAL_WORLD_SIZE"] = "1"
    result = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, "[]"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.split("RESULT", 1)[1]) == [None, 1]
    assert "OMP_NUM_THREADS is unset" not in result.stdout


@pytest.mark.parametrize("local_rank,visible,ranks_per_node,expected", [
    (3, 1, 4, 0),  # per-task binding (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank)
    (0, 1, 1, 0),
    (3, 8, 8, 3),  # every rank sees the node's GPUs
    (3, 8, 4, 3),
    (3, 8, None, 3),  # ranks per node unknown
    (1, 4, 2, 1),
    (3, 2, 4, "2 CUDA devices"),  # 4 ranks, 2 GPUs each: neither layout
    (1, 2, 4, "4 ranks on this node"),  # the same on a rank whose index would exist: every rank says it
    (5, 4, None, "local rank 5"),
    (0, 0, 1, "sees no CUDA device"),
])
def test_cuda_device_index(local_rank, visible, ranks_per_node, expected):
    if isinstance(expected, int):
        assert distributed.cuda_device_index(local_rank, visible, ranks_per_node) == expected
    else:
        with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES") as error:
            distributed.cuda_device_index(local_rank, visible, ranks_per_node)
        assert expected in str(error.value) and "\n" not in str(error.value)
        if visible:
            assert "--gpus-per-task" in str(error.value)


def test_local_rank_argument_and_environment(monkeypatch):
    # The deepspeed launcher passes --local_rank=N (also as --local-rank) and sets LOCAL_RANK; the
    # argument is accepted and ignored, the environment says the rank.
    from wpn_dist.app.config import parse_config
    assert parse_config(["--local_rank=1"]).train.local_rank == 1
    assert parse_config(["--local-rank", "1"]).train.local_rank == 1
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.env_local_rank() == 1
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert distributed.env_local_rank() == 2


def test_init_binds_a_per_task_gpu_to_device_0(monkeypatch):
    # init()'s GPU branch on a CPU machine: one visible GPU for local rank 3 of 4 (srun --gpus-per-task=1).
    import deepspeed
    import torch
    chosen, joined = [], []
    monkeypatch.setattr(distributed, "on_cpu", lambda: False)
    monkeypatch.setattr(distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: joined.append(kwargs))
    for name in ("WPN_DIST_NODE_LOCAL_RANK", "SLURM_PROCID", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("WPN_DIST_NODE_LOCAL_RANK", "")  # registered with monkeypatch, so it is undone
    monkeypatch.delenv("WPN_DIST_NODE_LOCAL_RANK")
    distributed.init()
    assert chosen == [0] and joined and joined[0]["dist_backend"] == "nccl"
    assert os.environ["LOCAL_RANK"] == "0"  # what DeepSpeed's engine and zero.Init take as the device
    assert distributed.env_local_rank() == 3  # the node-local rank
    # Two GPUs for four ranks on the node: one line and exit 2 before joining.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WPN_DIST_NODE_LOCAL_RANK")
    monkeypatch.setenv("LOCAL_RANK", "1")
    joined.clear()
    with pytest.raises(SystemExit) as leaving:
        distributed.init()
    assert leaving.value.code == 2 and not joined
