"""Hub ids for the model and the data, read from a local fake Hugging Face cache (tests/fake_hub.py):
a 2-rank run offline with HF_HOME, one error line for what the cache lacks, the fetch made once per
node by local rank 0 while the other ranks wait, and the prepare command."""
import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, cpu_env, run_ranks
from fake_hub import add_repo

MODEL_ID, DATA_ID = "fake-org/tiny-opt", "fake-org/pku-mini"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """A Hugging Face home holding a tiny OPT (weights, config, tokenizer) and PKU-format data."""
    from wpn_dist.app import models
    work = tmp_path_factory.mktemp("hub")
    tokenizer = models.load_tokenizer("tiny-opt")
    model = models.load_model("tiny-opt", tokenizer, init="random", seed=3)
    model.save_pretrained(work / "src_model")
    tokenizer.save_pretrained(work / "src_model")
    (work / "src_data").mkdir()
    (work / "src_data" / "train.jsonl").write_text(open(os.path.join(REPO, "tests/data/pku_sample.jsonl")).read())
    home = work / "hf"
    add_repo(str(home), MODEL_ID, str(work / "src_model"))
    add_repo(str(home), DATA_ID, str(work / "src_data"), repo_type="dataset")
    # A model whose download was cut short: its weights are missing from the snapshot.
    add_repo(str(home), "fake-org/cut-short", str(work / "src_model"), skip=("model.safetensors",))
    return home


def offline_env(home, **extra):
    return dict(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)


def train_argv(model=MODEL_ID, *extra):
    return ["wpn_dist/train.py", "--model", model, "--data", DATA_ID, "--steps", "2", "--micro_batch_size", "2",
            "--evaluate", "false", "--export_hf", "false", "--ds_config", "zero3", *extra]


def test_two_ranks_train_offline_from_hub_ids(hf_home, tmp_path):
    # No --output_dir: the run goes under OUTPUT_ROOT. No --max_length: it follows from the data.
    result = run_ranks(train_argv(), **offline_env(hf_home, OUTPUT_ROOT=str(tmp_path / "root")))
    runs = os.listdir(tmp_path / "root")
    assert len(runs) == 1 and runs[0].startswith("wpn-tiny-opt-"), runs
    summary = json.loads((tmp_path / "root" / runs[0] / "summary.json").read_text())
    assert summary["steps_run"] == 2 and summary["world_size"] == 2
    config = json.loads((tmp_path / "root" / runs[0] / "config.json").read_text())
    assert config["model"]["model"] == MODEL_ID  # the name the user gave, not the cache path
    # The length report: pku_sample's pairs, byte-level tokens, all under the default max_length.
    log = result.stdout + result.stderr
    assert "token lengths (prompt + response) of" in log and "0 responses longer than --max_length" in log, log[-3000:]
    assert config["data"]["max_length"] % 64 == 0


def test_missing_from_the_cache_is_one_line(hf_home, tmp_path):
    for model, expected in [("fake-org/absent", "model fake-org/absent: not in the Hugging Face cache"),
                            ("fake-org/cut-short", "no weights (*.safetensors or *.bin)")]:
        result = subprocess.run([sys.executable] + train_argv(model, "--output_dir", str(tmp_path / "run")),
                                cwd=REPO, env=cpu_env(**offline_env(hf_home)), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("wpn_dist: error:")]
        assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "run").exists()


def test_a_missing_shard_is_named(tmp_path):
    from wpn_dist.app.hub import FetchError, check_model_files
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(FetchError, match="model-00002-of-00002.safetensors is missing"):
        check_model_files(str(tmp_path), "org/m")


def _rank(local_rank: int, word_dir: str, log: str, fail: bool) -> None:
    """One rank of a node: the download is faked (the network is the only part not under test)."""
    os.environ.update(LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE="3", WORLD_SIZE="3", MASTER_PORT="1234")
    from wpn_dist.app import hub

    def fake_download(job, local_only):
        with open(log, "a") as f:
            f.write(json.dumps({"rank": local_rank, "local_only": local_only, "at": time.time()}) + "\n")
        if not local_only:
            time.sleep(1.0)  # a download that takes time: the others must wait for it
            if fail:
                raise hub.FetchError("model org/m: cannot download (HTTPError: 401)")
        return "/snapshot"
    hub._download = fake_download
    try:
        paths = hub.fetch_all([hub.Fetch("org/m")], word_dir)
        result = {"ok": paths[hub.Fetch("org/m")]}
    except hub.FetchError as e:
        result = {"error": str(e)}
    with open(f"{log}.{local_rank}", "w") as f:
        json.dump(result, f)


@pytest.mark.parametrize("fail", [False, True])
def test_one_download_per_node_by_local_rank_0(tmp_path, fail, monkeypatch):
    log = str(tmp_path / "calls.jsonl")
    # An earlier launch's word, under the name this launch's ranks use (same variables, same parent):
    # it is about other fetches, so the waiting ranks must not take it as local rank 0's.
    from wpn_dist.app import hub
    with monkeypatch.context() as m:
        m.setenv("MASTER_PORT", "1234")
        m.setattr(os, "getppid", os.getpid)  # the ranks' parent is this process
        stale = tmp_path / f"wpn_dist-fetch-{hub._launch_token()}.json"
    stale.write_text(json.dumps({"jobs": ["model:org/other:model:None"], "ok": True}))
    context = multiprocessing.get_context("fork")
    # The waiting ranks start first: they must not download, only wait for local rank 0's word.
    procs = [context.Process(target=_rank, args=(r, str(tmp_path), log, fail)) for r in (2, 1, 0)]
    for p in procs:
        p.start()
        time.sleep(0.2)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    calls = [json.loads(line) for line in open(log)]
    downloads = [c for c in calls if not c["local_only"]]
    assert [c["rank"] for c in downloads] == [0]
    results = [json.load(open(f"{log}.{r}")) for r in range(3)]
    if fail:  # every rank reports local rank 0's error, and nobody reads a cache that is not there
        assert all(r == {"error": "model org/m: cannot download (HTTPError: 401)"} for r in results)
        assert len(calls) == 1
    else:  # the others read the cache only after the download has ended
        assert all(r == {"ok": "/snapshot"} for r in results)
        reads = [c for c in calls if c["local_only"]]
        assert sorted(c["rank"] for c in reads) == [1, 2]
        assert min(c["at"] for c in reads) >= downloads[0]["at"] + 1.0


def test_prepare_reports_lengths_ops_and_disk(hf_home, tmp_path):
    result = subprocess.run([sys.executable, "-m", "wpn_dist.prepare", "--model", MODEL_ID, "--data", DATA_ID,
                             "--cache_dir", str(hf_home), "--keep_checkpoints", "3"], cwd=REPO,
                            env=cpu_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "token lengths (prompt + response) of" in out
    # The default zero3 run's optimizer is FusedAdam on GPUs: this CPU machine says it cannot build it.
    assert "not built: FusedAdamBuilder" in out and "DS_ACCELERATOR=cuda" in out
    from wpn_dist.app import checkpoint, models
    num_params = sum(p.numel() for p in models.meta_model("tiny-opt").parameters())
    one = checkpoint.estimated_bytes(num_params, "fp32")
    assert f"one checkpoint {one / 2**30:,.1f} GiB" in out and "3 kept + 1 being written" in out
    assert f"export HF_HOME={hf_home} HF_HUB_OFFLINE=1" in out


def test_ops_needed_follow_the_optimizer():
    from wpn_dist.app.engine import read_ds_config
    from wpn_dist.app.prepare import ops_needed
    assert ops_needed(read_ds_config("zero3"), "cuda") == ["FusedAdamBuilder"]
    assert ops_needed(read_ds_config("zero3_offload"), "cuda") == ["CPUAdamBuilder"]
    assert ops_needed(read_ds_config("zero3"), "cpu") == []


def test_what_is_a_hub_id(tmp_path, monkeypatch):
    from wpn_dist.app.hub import data_fetch, model_fetch
    assert data_fetch("PKU-Alignment/PKU-SafeRLHF", "auto").repo_type == "dataset"
    assert data_fetch("data/rows.jsonl", "auto") is None  # a missing file, not a dataset id
    assert model_fetch("opt-1.3b").repo_id == "facebook/opt-1.3b"  # a spec's weights
    assert model_fetch("opt-1.3b", init="random") is None  # the spec is the architecture
    assert model_fetch("org/m", init="random").what == "config"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "m").mkdir(parents=True)
    assert model_fetch("org/m") is None  # a local directory of that name wins


def test_output_root(monkeypatch):
    from wpn_dist.app.preflight import output_root
    monkeypatch.delenv("OUTPUT_ROOT", raising=False)
    monkeypatch.delenv("SCRATCH", raising=False)
    assert output_root() == "runs"
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    assert output_root() == "/scratch/me/wpn_dist"
    monkeypatch.setenv("OUTPUT_ROOT", "/big/runs")
    assert output_root() == "/big/runs"
