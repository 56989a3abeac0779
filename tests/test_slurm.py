"""The Slurm templates (slurm/*.sh): syntax and dry runs (also of the knobs for a real cluster: CONFIG, DATA,
EXTRA_ARGS and script arguments, OUTPUT_ROOT/SCRATCH, the offline caches), then end to end against a real
one-node Slurm on localhost (munged, slurmctld, slurmd started by the `slurm` fixture, stopped by PID
afterwards): a run of a saved tiny model, offline, with a CONFIG file and script arguments, completes; a stop signal checkpoints, requeues and resumes exactly; a SIGKILLed rank ends the job
without hanging and a resubmission resumes; a two-"node" run started the way the templates start it
matches a one-node run.

The Slurm tests need the Slurm and MUNGE binaries (`bash slurm/install-test-slurm.sh`, as .ci/run does)
and root; without them they fail, saying so."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, cpu_env, free_port, run_deepspeed
from slurm_cluster import INSTALL_HINT, LocalSlurm, missing_binaries
from wpn_dist.app import checkpoint

SLURM_DIR = os.path.join(REPO, "slurm")
MODEL_TEMPLATES = ["opt1.3b", "opt2.7b", "opt6.7b", "opt13b", "opt30b", "opt66b", "gpt-neo-1.3b", "gpt-neo-2.7b",
                   "gpt-j-6b", "gpt-neox-20b"]
TEMPLATES = MODEL_TEMPLATES + ["tiny"]
# A run of the tiny template long enough to be signalled or killed mid-way (~0.2 s a step); the low lr
# keeps the loss O(1) over the whole run, so that comparing losses means something.
LONG = {"STEPS": "30", "LR": "3e-5", "SAVE_EVERY": "10"}
RANK_LINE = re.compile(r"^rank: host=(\S+) RANK=(\d+) LOCAL_RANK=(\d+) WORLD_SIZE=(\d+) MASTER_ADDR=(\S+) "
                       r"MASTER_PORT=(\d+) (.*)$")


# --- helpers -----------------------------------------------------------------------------------------

# The templates' knobs that a developer's shell may hold; the dry runs start without them.
KNOBS = ("CONFIG", "MODEL", "MODEL_INIT", "DATA", "DATA_FORMAT", "DS_CONFIG", "PRECISION", "MICRO_BATCH_SIZE",
         "GRAD_ACCUM", "ACTIVATION_CHECKPOINTING", "STEPS", "LR", "SAVE_EVERY", "LOG_EVERY", "EXPORT_HF",
         "OUTPUT_ROOT", "OUTPUT_DIR", "SCRATCH", "EXTRA_ARGS", "SRUN_ARGS", "PYTHON", "HF_HOME", "HF_HUB_OFFLINE",
         "HF_DATASETS_OFFLINE", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")
# What every template needs from the user (tiny.sh has its own DATA).
REQUIRED = {"DATA": "tests/data/tiny.jsonl", "OUTPUT_ROOT": "runs"}


def dry_run(template: str, cwd: str = REPO, args=(), check: bool = True, required: bool = True,
            **env) -> subprocess.CompletedProcess:
    """`WPN_DIST_DRY_RUN=1 bash slurm/<template>.sh *args` with ``env`` (a None value: unset), by default with
    REQUIRED's DATA and OUTPUT_ROOT."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WPN_DIST_")) and k not in KNOBS}
    full = dict(base, WPN_DIST_DRY_RUN="1", **(REQUIRED if required else {}))
    full.update(env)
    full = {k: v for k, v in full.items() if v is not None}
    result = subprocess.run(["bash", os.path.join(SLURM_DIR, f"{template}.sh"), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=60, env=full)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def srun_argv(output: str) -> list:
    """The trainer's argv of the dry run's srun line (from the python, after srun's own options)."""
    line = next(line for line in output.splitlines() if line.startswith("srun: "))
    words = shlex.split(line[len("srun: "):])
    return words[next(i for i, w in enumerate(words) if w.endswith("wpn_dist/train.py")) - 1:]


def env_line(output: str) -> dict:
    """The dry run's `# env:` line as a dict."""
    line = next(line for line in output.splitlines() if line.startswith("# env: "))
    return dict(word.split("=", 1) for word in shlex.split(line[len("# env: "):]))


def options(argv: list) -> list:
    """The --options of an argv, in order."""
    return [w.split("=", 1)[0] for w in argv if w.startswith("--")]


def rank_lines(output: str) -> list:
    """The dry run's per-rank lines as dicts (host, rank, local_rank, world_size, master_addr, master_port,
    argv)."""
    out = []
    for line in output.splitlines():
        if line.startswith("rank: "):
            m = RANK_LINE.match(line)
            assert m, line
            host, r, lr, ws, addr, port, command = m.groups()
            out.append(dict(host=host, rank=int(r), local_rank=int(lr), world_size=int(ws), master_addr=addr,
                            master_port=int(port), argv=shlex.split(command)))
    return out


def losses(run_dir) -> dict:
    """step -> logged loss; a step logged twice (before a stop and after the resume) keeps the last."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss/total"] for r in rows}


def logged_steps(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def wait_for(condition, timeout: float, what: str, poll: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def assert_same_losses(got: dict, want: dict, steps) -> None:
    for step in steps:
        assert got[step] == pytest.approx(want[step], abs=1e-6, rel=1e-6), step


class Job:
    """One submission of slurm/tiny.sh: its id, output file and run directory."""

    def __init__(self, cluster: LocalSlurm, tmp, args=(), **knobs):
        self.cluster, self.tmp = cluster, str(tmp)
        os.makedirs(self.tmp, exist_ok=True)  # Slurm does not create the --output file's directory
        env = cluster.env(cpu_env(OUTPUT_ROOT=os.path.join(self.tmp, "runs"), **knobs))
        # sbatch from the repository root, as the README says: the job finds the checkout through
        # SLURM_SUBMIT_DIR (Slurm runs a copy of the script from its spool directory). `args` are the batch
        # script's own arguments (trainer options).
        self.id = cluster.sbatch(f"--output={self.tmp}/slurm-%x-%j.out", os.path.join("slurm", "tiny.sh"), *args,
                                 env=env, cwd=REPO)
        self.output_path = os.path.join(self.tmp, f"slurm-wpn-tiny-{self.id}.out")
        self.run_dir = knobs.get("OUTPUT_DIR") or os.path.join(self.tmp, "runs", f"wpn-tiny-{self.id}")

    def output(self) -> str:
        return open(self.output_path, errors="replace").read() if os.path.exists(self.output_path) else ""

    def wait(self, timeout: float = 300, **kwargs) -> dict:
        try:
            return self.cluster.wait_job(self.id, timeout=timeout, **kwargs)
        except TimeoutError as e:
            pytest.fail(f"{e}\n--- job output\n{self.output()[-4000:]}\n{self.cluster.logs()}")

    def wait_completed(self, timeout: float = 300) -> dict:
        info = self.wait(timeout)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{self.output()[-4000:]}"
        return info

    def rank_pids(self) -> dict:
        """SLURM_PROCID -> PID of this job's trainer processes (read from /proc)."""
        pids = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                environ = dict(item.split(b"=", 1) for item in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                               if b"=" in item)
            except OSError:
                continue
            if environ.get(b"SLURM_JOB_ID") == str(self.id).encode() and any(a.endswith(b"wpn_dist/train.py")
                                                                            for a in cmdline):
                pids[int(environ[b"SLURM_PROCID"])] = int(pid)
        return pids


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node Slurm on localhost for the session; its daemons are stopped by PID afterwards."""
    missing = missing_binaries()
    if missing:
        pytest.fail(f"Slurm/MUNGE binaries missing ({', '.join(missing)}): {INSTALL_HINT}", pytrace=False)
    cluster = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except RuntimeError as e:
        pytest.fail(f"could not start the local Slurm: {e}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory):
    """An uninterrupted Slurm run of the LONG config."""
    job = Job(slurm, tmp_path_factory.mktemp("reference"), **LONG)
    job.wait_completed()
    return job


# --- templates: syntax, dry runs (no Slurm needed) -------------------------------------------------------

@pytest.mark.parametrize("name", TEMPLATES + ["common"])
def test_template_syntax(name):
    result = subprocess.run(["bash", "-n", os.path.join(SLURM_DIR, f"{name}.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dry_run_of_opt66b_on_8_nodes_of_8_gpus():
    result = dry_run("opt66b", SLURM_JOB_ID="4242", SLURM_JOB_NAME="wpn-opt-66b", SLURM_JOB_NODELIST="gpu[001-008]",
                     SLURM_JOB_NUM_NODES="8", SLURM_NTASKS="64", SLURM_NTASKS_PER_NODE="8",
                     SLURM_TASKS_PER_NODE="8(x8)", SLURM_CPUS_PER_TASK="8")
    srun = [line for line in result.stdout.splitlines() if line.startswith("srun: ")]
    assert len(srun) == 1
    for option in ("--kill-on-bad-exit=0", "--wait=30", "--ntasks=64", "--ntasks-per-node=8", "--cpus-per-task=8"):
        assert option in srun[0]
    ranks = rank_lines(result.stdout)
    assert [r["rank"] for r in ranks] == list(range(64))
    hosts = [f"gpu{i:03d}" for i in range(1, 9)]
    for r in ranks:
        assert r["host"] == hosts[r["rank"] // 8] and r["local_rank"] == r["rank"] % 8
        assert (r["world_size"], r["master_addr"], r["master_port"]) == (64, "gpu001", 20000 + 4242 % 20000)
        argv = r["argv"]
        assert argv[1] == "wpn_dist/train.py"
        options = dict(zip(argv[2::2], argv[3::2]))
        assert options["--model"] == "opt-66b" and options["--resume"] == "auto"
        assert options["--output_dir"] == "runs/wpn-opt-66b-4242"  # OUTPUT_ROOT=runs


@pytest.mark.parametrize("name", MODEL_TEMPLATES)
def test_dry_run_of_each_template_from_its_sbatch_lines(name, tmp_path):
    # No SLURM_* variables: the allocation comes from the template's own #SBATCH lines; run from
    # another directory, the template finds the checkout from its own path.
    text = open(os.path.join(SLURM_DIR, f"{name}.sh")).read()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
    per_node = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)", text, re.M).group(1))
    model = re.search(r'^: "\$\{MODEL:=(\S+)\}"', text, re.M).group(1)
    result = dry_run(name, cwd=str(tmp_path), WPN_DIST_HOSTS=" ".join(f"h{i}" for i in range(nodes)))
    ranks = rank_lines(result.stdout)
    assert len(ranks) == nodes * per_node == ranks[0]["world_size"]
    assert {r["master_addr"] for r in ranks} == {"h0"}
    assert [r["host"] for r in ranks] == [f"h{i // per_node}" for i in range(nodes * per_node)]
    assert all(r["argv"][r["argv"].index("--model") + 1] == model for r in ranks)


def test_outside_slurm_without_dry_run_is_a_clear_error():
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WPN_DIST_"))}
    result = subprocess.run(["bash", os.path.join(SLURM_DIR, "tiny.sh")], cwd=REPO, capture_output=True, text=True,
                            env=base, timeout=60)
    assert result.returncode == 2 and "not inside a Slurm job" in result.stderr


# --- the knobs for a real cluster: CONFIG, DATA, EXTRA_ARGS and arguments, OUTPUT_ROOT, offline caches ---------

def test_config_file_beats_template_defaults_and_env_knobs_beat_the_file(tmp_path):
    from wpn_dist.app.config import parse_config
    config = tmp_path / "run.yaml"
    config.write_text("precision: fp32\nmicro-batch-size: 2\ndata: PKU-Alignment/PKU-SafeRLHF\nsteps: 7\n")
    # The file's precision, micro-batch and data win over opt6.7b.sh's bf16, 4 and (no) DATA; the template
    # still sets what the file leaves alone (model, ds_config, ...), and the hub data is read as pku.
    argv = srun_argv(dry_run("opt6.7b", CONFIG=str(config), DATA=None).stdout)
    assert argv[2:4] == ["--config", str(config)]
    assert not {"--precision", "--micro_batch_size", "--data", "--steps"} & set(options(argv))
    cfg = parse_config(argv[2:])
    assert (cfg.train.precision, cfg.train.micro_batch_size, cfg.train.steps) == ("fp32", 2, 7)
    assert (cfg.model.model, cfg.data.data, cfg.data.data_format) == ("opt-6.7b", "PKU-Alignment/PKU-SafeRLHF", "pku")
    assert (cfg.train.ds_config, cfg.train.save_every, cfg.train.resume) == ("zero3", 50, "auto")
    # Knobs set in the environment, then EXTRA_ARGS, then the script's arguments beat the file.
    result = dry_run("opt6.7b", CONFIG=str(config), PRECISION="bf16", MICRO_BATCH_SIZE="1", EXTRA_ARGS="--steps 8",
                     args=["--steps", "9"])
    cfg = parse_config(srun_argv(result.stdout)[2:])
    assert (cfg.train.precision, cfg.train.micro_batch_size, cfg.train.steps) == ("bf16", 1, 9)
    assert cfg.data.data == "tests/data/tiny.jsonl"
    assert "# config: CONFIG=" in result.stdout and "left to it: none" in result.stdout  # DATA_FORMAT follows DATA


def test_config_errors_are_one_line_before_srun(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    cases = {"missing.yaml": "CONFIG=missing.yaml: no such file", str(tmp_path / "list.json"): "must hold a mapping"}
    for path, message in cases.items():
        result = dry_run("opt6.7b", CONFIG=path, check=False)
        assert result.returncode == 2 and not result.stdout, result.stdout
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    # --config must come as CONFIG (the template must know the file to leave its values alone).
    result = dry_run("opt6.7b", args=["--config", str(tmp_path / "list.json")], check=False)
    assert result.returncode == 2 and "CONFIG=FILE" in result.stderr and not result.stdout


def test_data_must_be_given_explicitly():
    result = dry_run("opt6.7b", DATA=None, check=False)
    assert result.returncode == 2 and not result.stdout and result.stderr.count("\n") == 1
    assert "DATA=PKU-Alignment/PKU-SafeRLHF" in result.stderr
    argv = srun_argv(dry_run("opt6.7b", DATA="PKU-Alignment/PKU-SafeRLHF").stdout)
    assert argv[argv.index("--data") + 1:argv.index("--data") + 4] == ["PKU-Alignment/PKU-SafeRLHF", "--data_format",
                                                                        "pku"]


def test_extra_args_keep_quoted_spaces_and_script_arguments_come_last():
    extra = """--prompt_format "Q: {prompt} A:" --eval_prompts 'my prompts.jsonl' --lr 1e-4"""
    result = dry_run("opt6.7b", EXTRA_ARGS=extra, LR="1e-5", args=["--max_length", "64", "--lr", "2e-4"])
    for argv in [srun_argv(result.stdout)] + [r["argv"] for r in rank_lines(result.stdout)]:
        tail = argv[argv.index("--resume") + 2:]
        assert tail == ["--prompt_format", "Q: {prompt} A:", "--eval_prompts", "my prompts.jsonl", "--lr", "1e-4",
                        "--max_length", "64", "--lr", "2e-4"]
    result = dry_run("opt6.7b", EXTRA_ARGS='--prompt_format "Q: {prompt}', check=False)
    assert result.returncode == 2 and "EXTRA_ARGS: unbalanced quotes" in result.stderr and not result.stdout


def test_output_root_defaults_to_scratch_and_is_required_without_it():
    result = dry_run("opt6.7b", OUTPUT_ROOT=None, check=False)
    assert result.returncode == 2 and not result.stdout and result.stderr.count("\n") == 1
    assert "OUTPUT_ROOT" in result.stderr and "SCRATCH" in result.stderr and "OUTPUT_ROOT=$PWD/runs" in result.stderr
    argv = srun_argv(dry_run("opt6.7b", OUTPUT_ROOT=None, SCRATCH="/scratch/me").stdout)
    assert argv[argv.index("--output_dir") + 1] == "/scratch/me/wpn_dist/wpn-opt-6.7b-12345"
    argv = srun_argv(dry_run("opt6.7b", OUTPUT_ROOT=None, OUTPUT_DIR="/shared/run1").stdout)  # no root needed
    assert argv[argv.index("--output_dir") + 1] == "/shared/run1"


def test_offline_cache_and_threads_in_the_env_line():
    env = env_line(dry_run("opt6.7b", HF_HOME="/shared/hf").stdout)
    assert env == {"OMP_NUM_THREADS": "8", "HF_HOME": "/shared/hf", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "TORCH_EXTENSIONS_DIR": "/shared/hf/torch_extensions"}
    env = env_line(dry_run("tiny", WPN_DIST_OFFLINE="0", TORCH_EXTENSIONS_DIR="/ext", OMP_NUM_THREADS="3").stdout)
    assert env == {"OMP_NUM_THREADS": "3", "HF_HOME": "", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
                   "TORCH_EXTENSIONS_DIR": "/ext"}
    env = env_line(dry_run("tiny", HF_HUB_OFFLINE="0").stdout)  # tiny.sh: --cpus-per-task=1
    assert (env["OMP_NUM_THREADS"], env["HF_HUB_OFFLINE"], env["HF_DATASETS_OFFLINE"], env["TORCH_EXTENSIONS_DIR"]) \
        == ("1", "0", "1", "")


# --- a real Slurm on localhost -----------------------------------------------------------------------------

def test_hostlist_expansion_matches_scontrol(slurm):
    for hostlist in ["gpu[001-003,7],login1", "node1", "a[1-2]b[08-10],c", "rack[1-2]-n[9-11]"]:
        want = slurm.run("scontrol", "show", "hostnames", hostlist).stdout.split()
        got = subprocess.run(["bash", "-c", 'source slurm/common.sh; wpn_expand_hostlist "$1"', "-", hostlist],
                             cwd=REPO, capture_output=True, text=True, env=dict(os.environ, WPN_DIST_FUNCTIONS_ONLY="1"))
        assert got.stdout.split() == want, (hostlist, got.stderr)


def test_tiny_template_completes_on_two_tasks(slurm, tmp_path):
    """As on a real cluster: a model saved on a shared disk (`python -m wpn_dist.tiny_model`, loaded as
    pretrained under ZeRO-3), offline from HF_HOME, a CONFIG file whose values beat the template's defaults
    (tiny.sh's STEPS=8, LOG_EVERY=1), and a trainer option with spaces as the batch script's own argument,
    which sbatch hands to the script."""
    from wpn_dist.bench.tiny_model import save_tiny_model
    model = save_tiny_model(str(tmp_path / "tiny-opt"))
    config = tmp_path / "run.yaml"
    config.write_text("steps: 6\nlog_every: 2\n")
    hf_home = tmp_path / "hf"
    job = Job(slurm, tmp_path, args=["--prompt_format", "Q: {prompt} A:"], MODEL=model, CONFIG=str(config),
              HF_HOME=str(hf_home))
    job.wait_completed()
    run = job.run_dir
    summary = json.loads(open(os.path.join(run, "summary.json")).read())
    assert (summary["world_size"], summary["steps"], summary["first_step"]) == (2, 6, 1)
    resolved = json.loads(open(os.path.join(run, "config.json")).read())
    assert (resolved["model"]["model"], resolved["model"]["model_init"]) == (model, "pretrained")
    assert resolved["data"]["prompt_format"] == "Q: {prompt} A:" and resolved["train"]["log_every"] == 2
    newest = checkpoint.newest_complete(run)
    assert newest.endswith("step00000006") and checkpoint.problem_with(newest) is None
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run, "tensorboard")))
    assert sorted(losses(run)) == [2, 4, 6]
    output = job.output()
    assert f"job {job.id} (wpn-tiny), restart 0, nodes localhost, 2 ranks" in output
    # A TORCH_EXTENSIONS_DIR of the test's environment is kept (its ops are built there already).
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or f"{hf_home}/torch_extensions"
    assert f"env: OMP_NUM_THREADS=1 HF_HOME={hf_home} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 " \
           f"TORCH_EXTENSIONS_DIR={extensions}" in output
    assert "world size 2" in output and "done in" in output


def test_stop_signal_checkpoints_requeues_and_resumes_exactly(slurm, reference, tmp_path):
    job = Job(slurm, tmp_path, **LONG)
    wait_for(lambda: logged_steps(job.run_dir) >= 3, 240, "3 logged steps")
    # As on preemption or `--signal=USR1@T`: the signal goes to the job's steps, i.e. to every rank.
    slurm.run("scancel", "--signal=USR1", str(job.id))
    info = job.wait(120, poll=0.5, until=lambda i: i.get("JobState") not in ("RUNNING", "COMPLETING", "CONFIGURING"))
    # What Slurm 22.05 does with `scontrol requeue` from inside the job: the job goes back to PENDING, not
    # held, Restarts=1, eligible again cred_expire + 1 s later (Reason=BeginTime; 121 s by default, 11 s in
    # this cluster). Starting it earlier (`scontrol update StartTime=now`) makes slurmd refuse it: FAILED.
    assert (info["JobState"], info["Restarts"]) == ("PENDING", "1"), f"{info}\n{job.output()[-3000:]}"
    if "Held" in info.get("Reason", ""):  # not seen with 22.05; a site's policy might hold requeued jobs
        slurm.run("scontrol", "release", str(job.id))
    info = job.wait_completed()
    assert info["Restarts"] == "1"
    output = job.output()  # --open-mode=append: both runs' output
    stopped_at = int(re.search(r"stop signal: checkpoint \S+ saved at step (\d+); exiting with status 99", output)[1])
    assert 3 <= stopped_at < int(LONG["STEPS"])
    assert f"requeueing job {job.id}" in output and f"job {job.id} (wpn-tiny), restart 1" in output
    assert f"resumed from {job.run_dir}/checkpoints/step{stopped_at:08d} at step {stopped_at}" in output
    want, got = losses(reference.run_dir), losses(job.run_dir)
    assert sorted(got) == list(range(1, 31))
    assert_same_losses(got, want, range(stopped_at + 1, 31))
    summary = json.loads(open(os.path.join(job.run_dir, "summary.json")).read())
    ref_summary = json.loads(open(os.path.join(reference.run_dir, "summary.json")).read())
    assert (summary["first_step"], summary["world_size"]) == (stopped_at + 1, 2)
    assert summary["final_loss"] == pytest.approx(ref_summary["final_loss"], abs=1e-6, rel=1e-6)


def test_sigkill_of_one_rank_ends_the_job_and_a_resubmission_resumes(slurm, reference, tmp_path):
    job = Job(slurm, tmp_path, **LONG)
    latest = os.path.join(checkpoint.checkpoint_root(job.run_dir), "latest")
    wait_for(lambda: os.path.exists(latest) and logged_steps(job.run_dir) >= 12, 240, "the step-10 checkpoint")
    pids = wait_for(lambda: job.rank_pids() if len(job.rank_pids()) == 2 else None, 30, "both ranks' PIDs")
    killed_at = time.time()
    os.kill(pids[1], signal.SIGKILL)
    info = job.wait(60, poll=0.5)  # the other rank fails or srun --wait ends it, and the job: no hang
    assert time.time() - killed_at < 60
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0" and info["Restarts"] == "0", info
    assert not job.rank_pids()
    assert "srun exited with status" in job.output()
    newest = checkpoint.newest_complete(job.run_dir)
    assert newest is not None and checkpoint.problem_with(newest) is None
    resumed_at = json.load(open(os.path.join(newest, checkpoint.MANIFEST)))["step"]
    assert resumed_at >= 10

    again = Job(slurm, tmp_path / "again", OUTPUT_DIR=job.run_dir, **LONG)
    again.wait_completed()
    assert f"resumed from {newest} at step {resumed_at}" in again.output()
    want, got = losses(reference.run_dir), losses(job.run_dir)
    assert sorted(got) == list(range(1, 31))
    assert_same_losses(got, want, range(resumed_at + 1, 31))


# --- two "nodes" on this machine, started the way the templates start them --------------------------------

def test_two_nodes_of_two_ranks_match_one_node_of_four(tmp_path):
    """The dry run of slurm/tiny.sh for 2 nodes x 2 tasks gives each rank's command; each "node" starts its
    two ranks with the environment srun gives them (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NODEID,
    and MASTER_ADDR/MASTER_PORT from the batch script). They train together as one world of 4 and match a
    one-node run of 4 ranks under the deepspeed launcher."""
    run = tmp_path / "two_nodes"
    dry = dry_run("tiny", SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="2",
                  WPN_DIST_HOSTS="127.0.0.1 localhost", WPN_DIST_MASTER_PORT=str(free_port()),
                  OUTPUT_DIR=str(run), PYTHON=sys.executable)
    ranks = rank_lines(dry.stdout)
    assert [(r["host"], r["rank"], r["local_rank"], r["world_size"]) for r in ranks] == \
        [("127.0.0.1", 0, 0, 4), ("127.0.0.1", 1, 1, 4), ("localhost", 2, 0, 4), ("localhost", 3, 1, 4)]
    assert {r["master_addr"] for r in ranks} == {"127.0.0.1"}
    procs = []
    for node_id, host in enumerate(["127.0.0.1", "localhost"]):  # one "launcher" per node
        for r in (r for r in ranks if r["host"] == host):
            env = cpu_env(SLURM_PROCID=str(r["rank"]), SLURM_LOCALID=str(r["local_rank"]),
                          SLURM_NTASKS=str(r["world_size"]), SLURM_NODEID=str(node_id), SLURM_NNODES="2",
                          MASTER_ADDR=r["master_addr"], MASTER_PORT=str(r["master_port"]))
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
                env.pop(key, None)
            procs.append(subprocess.Popen(r["argv"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        time.sleep(1)  # the second node comes up a little later
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

    reference = tmp_path / "one_node"
    argv = ranks[0]["argv"]
    args = argv[1:]
    args[args.index("--output_dir") + 1] = str(reference)
    run_deepspeed(args, num_procs=4)
    for path in (run, reference):
        summary = json.loads((path / "summary.json").read_text())
        assert (summary["world_size"], summary["steps"]) == (4, 8)
    want, got = losses(reference), losses(run)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    assert_same_losses(got, want, range(1, 9))


# --- what survives a preemption: each template's --signal margin against its checkpoint size ---------------

WRITE_BYTES_PER_S_PER_NODE = 1 << 30  # the file-system speed slurm/README.md assumes (1 GiB/s per node)


@pytest.mark.parametrize("name", MODEL_TEMPLATES)
def test_signal_margin_follows_from_the_models_checkpoint_size(name, tmp_path):
    """A USR1@T margin leaves a step plus a checkpoint save (twice the estimate, plus a minute), and the
    template hands T to the ranks so that they know their deadline."""
    from wpn_dist.app.checkpoint import estimated_bytes
    from wpn_dist.app.models import MODEL_SPECS, count_parameters
    text = open(os.path.join(SLURM_DIR, f"{name}.sh")).read()
    margin = int(re.search(r"^#SBATCH --signal=USR1@(\d+)", text, re.M).group(1))
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
    model = re.search(r'^: "\$\{MODEL:=(\S+)\}"', text, re.M).group(1)
    precision = re.search(r'^: "\$\{PRECISION:=(\S+)\}"', text, re.M).group(1)
    save_s = estimated_bytes(count_parameters(MODEL_SPECS[model]), precision) / (WRITE_BYTES_PER_S_PER_NODE * nodes)
    assert margin >= 2 * save_s + 60, (name, margin, save_s)
    result = dry_run(name, cwd=str(tmp_path), WPN_DIST_HOSTS=" ".join(f"h{i}" for i in range(nodes)))
    assert f"WPN_DIST_SIGNAL_MARGIN_S={margin} WPN_DIST_KILL_WAIT_S=30" in result.stdout
