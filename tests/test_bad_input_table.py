"""The bad-input table: every case, across train, evaluate, toybench, scaling and memory, ends with
one error line and exit status 2 before anything is touched, and a run directory that existed before
is byte-identical after (names, sizes and contents of every file)."""
import hashlib
import json
import os
import shutil

import pytest

from conftest import REPO

TINY = ["--model", "tiny-opt", "--model_init", "random", "--data", os.path.join(REPO, "tests", "data", "tiny.jsonl")]


def snapshot(directory) -> dict:
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture
def world(tmp_path):
    """An existing run (with a complete checkpoint saved by 4 ranks), and files to point options at."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "weights.pt").write_bytes(b"x" * 10)
    (ckpt / "manifest.json").write_text(json.dumps({"step": 2, "world_size": 4, "files": {"weights.pt": 10}}))
    (run / "checkpoints" / "latest").write_text("step00000002")
    (run / "config.json").write_text('{"the": "old run"}')
    (run / "summary.json").write_text('{"kept": true}')
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "auto_unknown.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "foo": "auto"}))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "unknown.yaml").write_text("learning_rate: 0.1\n")
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "not_a_checkpoint").mkdir()
    nomodel = tmp_path / "no_weights"
    nomodel.mkdir()
    (nomodel / "config.json").write_text(json.dumps({"model_type": "opt"}))
    return tmp_path, run


def train(t, run):
    return {
        "ds_config invalid JSON, overwrite": (TINY + ["--ds_config", f"{t}/bad.json", "--output_dir", run,
                                                      "--overwrite_output_dir"], "not valid JSON"),
        "ds_config missing": (TINY + ["--ds_config", "zero9", "--output_dir", run, "--overwrite_output_dir"],
                              "--ds_config zero9: no such file"),
        "ds_config auto without value": (TINY + ["--ds_config", f"{t}/auto_unknown.json", "--output_dir", run,
                                                 "--overwrite_output_dir"], 'no value for "auto" at foo'),
        "resume a non-checkpoint": (TINY + ["--resume", f"{t}/not_a_checkpoint", "--output_dir", run],
                                    "not a complete checkpoint (no manifest"),
        "resume other world size": (TINY + ["--resume", "auto", "--output_dir", run], "saved by 4 ranks"),
        "resume a path that is none": (TINY + ["--resume", f"{t}/nowhere", "--output_dir", run], "--resume must be"),
        "spec without weights": (["--model", "tiny-opt", "--data", TINY[-1], "--output_dir", run,
                                  "--overwrite_output_dir"], "without pretrained weights"),
        "model dir without weights": (["--model", f"{t}/no_weights", "--data", TINY[-1], "--output_dir", run,
                                       "--overwrite_output_dir"], "no weights"),
        "unknown model": (["--model", "opt-7b", "--output_dir", run, "--overwrite_output_dir"], "neither a known model"),
        "output dir is a file": (TINY + ["--output_dir", f"{t}/a_file"], "is a file"),
        "existing run without overwrite": (TINY + ["--output_dir", run], "already holds a run"),
        "config file missing": (["--config", f"{t}/none.yaml", "--output_dir", run], "--config"),
        "config not a mapping": (["--config", f"{t}/list.yaml", "--output_dir", run], "must hold a mapping"),
        "config unknown key": (["--config", f"{t}/unknown.yaml", "--output_dir", run], "unknown option 'learning_rate'"),
        "steps 0": (TINY + ["--steps", "0", "--output_dir", run, "--overwrite_output_dir"], "--steps must be at least 1"),
        "negative lr": (TINY + ["--lr", "-1", "--output_dir", run, "--overwrite_output_dir"], "--lr must be > 0"),
        "prompt noise over 1": (TINY + ["--prompt_noise", "1.5", "--output_dir", run, "--overwrite_output_dir"],
                                "--prompt_noise must be within [0, 1]"),
        "tamper steps 0": (TINY + ["--tamper_weight", "1", "--tamper_steps", "0", "--output_dir", run,
                                   "--overwrite_output_dir"], "--tamper_steps and --tamper_batch_size must be at least 1"),
        "data missing": (["--model", "tiny-opt", "--model_init", "random", "--data", f"{t}/none.jsonl",
                          "--output_dir", run, "--overwrite_output_dir"], "none.jsonl: no such file"),
        "eval prompts missing": (TINY + ["--eval_prompts", f"{t}/none.jsonl", "--output_dir", run,
                                         "--overwrite_output_dir"], "none.jsonl"),
        "prompt format": (TINY + ["--prompt_format", "Q:", "--output_dir", run, "--overwrite_output_dir"], "{prompt}"),
        "other method's option": (TINY + ["--icu_kl_weight", "1", "--output_dir", run, "--overwrite_output_dir"],
                                  "is an option of --method icu"),
    }


def others(t, run):
    return {
        "evaluate: no model dir": ("evaluate", ["--model", f"{t}/nowhere", "--out", run], "nowhere"),
        "evaluate: unknown option": ("evaluate", ["--model", f"{t}/nowhere", "--nope", "1"], "unknown option"),
        "evaluate: bad config": ("evaluate", ["--config", f"{t}/unknown.yaml"], "unknown option 'learning_rate'"),
        "toybench: unknown method": ("toybench", ["--methods", "wpn,dpo", "--out", run], "dpo"),
        "toybench: unknown option": ("toybench", ["--out", run, "--nope"], "unknown option"),
        "toybench: bad config": ("toybench", ["--config", f"{t}/list.yaml"], "must hold a mapping"),
        "scaling: grid missing": ("scaling", ["--grid", f"{t}/none.yaml", "--out", run], "none.yaml"),
        "scaling: unknown preset": ("scaling", ["--preset", "nope", "--out", run], "nope"),
        "scaling: unknown option": ("scaling", ["--out", run, "--nope", "1"], "unknown option"),
        "memory: unknown model": ("memory", ["--model", "opt-7b"], "opt-7b"),
        "memory: zero nodes": ("memory", ["--model", "opt-1.3b", "--nodes", "0"], "nodes"),
        "memory: unknown option": ("memory", ["--model", "opt-1.3b", "--nope"], "unknown option"),
    }


def run_main(tool: str, argv: list, capsys) -> tuple:
    if tool == "train":
        from wpn_dist.app.trainer import main
    elif tool == "evaluate":
        from wpn_dist.app.evaluation import main
    elif tool == "toybench":
        from wpn_dist.bench.toybench import main
    elif tool == "scaling":
        from wpn_dist.bench.scaling.study import main
    else:
        from wpn_dist.bench.memory import main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


TRAIN_CASES = list(train("T", "R"))
OTHER_CASES = list(others("T", "R"))


def _check(world, capsys, tool, argv, expected):
    t, run = world
    before = snapshot(run)
    listing = sorted(os.listdir(t))
    code, lines = run_main(tool, argv, capsys)
    assert code == 2 and len(lines) == 1, (code, lines)
    assert expected in lines[0], lines[0]
    assert snapshot(run) == before
    assert sorted(os.listdir(t)) == listing  # no new directory beside it either


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_refuses_before_touching_anything(case, world, capsys):
    t, run = world
    argv, expected = train(str(t), str(run))[case]
    _check(world, capsys, "train", argv, expected)


@pytest.mark.parametrize("case", OTHER_CASES)
def test_tools_refuse_with_one_line(case, world, capsys):
    t, run = world
    tool, argv, expected = others(str(t), str(run))[case]
    _check(world, capsys, tool, argv, expected)


def test_no_room_for_the_next_checkpoint(world, capsys, monkeypatch):
    t, run = world
    usage = shutil.disk_usage(t)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    _check(world, capsys, "train", TINY + ["--output_dir", str(t / "new")], "the next checkpoint needs about")


def test_the_table_is_large_enough():
    assert len(TRAIN_CASES) + len(OTHER_CASES) + 1 >= 30
