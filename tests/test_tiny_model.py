"""`python -m wpn_dist.tiny_model --out DIR`: a random-init tiny model saved to disk, loaded back as a
pretrained model (by transformers and by the trainer)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cpu_env
from wpn_dist.app.models import MODEL_SPECS, byte_level_tokenizer, load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny") / "tiny-opt")
    result = subprocess.run([sys.executable, "-m", "wpn_dist.tiny_model", "--out", out, "--seed", "0"], cwd=REPO,
                            env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"use --model {out}" in result.stdout
    return out


def test_saved_model_loads_with_transformers_as_the_spec(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert os.path.isfile(os.path.join(tiny_dir, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    spec = MODEL_SPECS["tiny-opt"]
    assert model.config.model_type == "opt"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (spec.num_layers, spec.hidden_size)
    assert model.config.vocab_size == len(tokenizer) == len(byte_level_tokenizer())
    assert tokenizer.decode(tokenizer("how do i pick a lock")["input_ids"]) == "how do i pick a lock"
    assert tokenizer.pad_token == "<pad>" and model.config.pad_token_id == tokenizer.pad_token_id
    # The same weights as `--model tiny-opt --model_init random` with that seed.
    fresh = load_model("tiny-opt", byte_level_tokenizer(), init="random", seed=0).state_dict()
    saved = model.state_dict()
    assert saved.keys() == fresh.keys() and all(torch.equal(saved[k], fresh[k]) for k in fresh)


def test_trainer_runs_a_step_on_the_saved_model_offline(tiny_dir, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "wpn_dist/train.py", "--model", tiny_dir, "--data", "tests/data/tiny.jsonl", "--steps", "1",
         "--micro_batch_size", "2", "--evaluate", "false", "--output_dir", str(run), "--ds_config", "zero2",
         "--export_hf", "false"],
        cwd=REPO, env=cpu_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    model = json.loads((run / "config.json").read_text())["model"]
    assert (model["model"], model["model_init"]) == (tiny_dir, "pretrained")
    assert json.loads((run / "summary.json").read_text())["steps"] == 1


def test_bad_options_are_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "wpn_dist.tiny_model", "--out", str(tmp_path), "--family", "gptj"],
                            cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "--family" in result.stderr
    assert not os.listdir(tmp_path)
