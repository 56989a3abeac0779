"""run_lm_eval on a tiny local lm_eval task (tests/fixtures/lm_eval_toy: the toy world's facts as
8-way multiple choice) with a tiny OPT trained here on half of those facts: the result's shape,
``limit``, clear errors, and (2 CPU ranks, one launcher run) both modes giving the single-process
numbers on every rank, and a failure on a rank raised on every rank."""
import json
import os
import random
import re
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, run_ranks
from wpn_dist.app import harness, models, toy_world as toy

FIXTURE = os.path.join(REPO, "tests", "fixtures", "lm_eval_toy")
TASK = "wpn_toy_qa"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def offline_in_repo(tmp_path_factory):
    """No downloads, a fresh datasets cache, and the repository as working directory (the task's
    data_files path is relative to it)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**OFFLINE, "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("datasets"))}.items():
            patch.setenv(key, value)
        patch.chdir(REPO)
        yield


def toy_world_docs():
    """The fixture's rows, from the default toy world: a colour and a home question per object."""
    world = toy.make_world(toy.ToyWorldConfig())
    rows = []
    for name, (color, place) in world.objects.items():
        rows.append({"question": toy.COLOR_TEMPLATES[0].format(o=name),
                     "choices": [f"the {name} is {c} ." for c in toy.COLORS], "label": toy.COLORS.index(color)})
        rows.append({"question": toy.PLACE_TEMPLATES[0].format(o=name),
                     "choices": [f"the {name} lives in {p} ." for p in toy.PLACES], "label": toy.PLACES.index(place)})
    return rows


def read_docs():
    with open(os.path.join(FIXTURE, "toy_qa.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer OPT (word-level tokenizer over the task's words) trained for 200 steps on the first half
    of the facts: it knows those (accuracy ~0.55 in all, chance being 1/8), so that wrongly pooled
    shards would show. Saved as a Hugging Face directory for the launcher run."""
    docs = read_docs()
    texts = [f"### Question: {d['question']} ### Answer: {d['choices'][d['label']]}" for d in docs[:48]]
    words = sorted({w for d in docs for text in [d["question"]] + d["choices"] for w in text.split()}
                   | {"###", "Question:", "Answer:"})
    tokenizer = toy.make_tokenizer(SimpleNamespace(vocabulary=lambda: words))
    torch.manual_seed(0)
    spec = replace(models.MODEL_SPECS["tiny-opt"], max_positions=64)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(models.build_config(spec, len(tokenizer), tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = random.Random(0)
    model.train()
    for _ in range(200):
        batch = tokenizer([texts[rng.randrange(len(texts))] for _ in range(32)], padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    path = tmp_path_factory.mktemp("lm_eval") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path.parent


@pytest.fixture(scope="module")
def local(trained):
    model, tokenizer, _ = trained
    rng_state = torch.get_rng_state()
    model.train()  # as if called during training: the mode is restored afterwards
    full = harness.run_lm_eval(model, tokenizer, [TASK], include_path=FIXTURE)
    kept = model.training and torch.equal(torch.get_rng_state(), rng_state)
    model.eval()
    return {"full": full, "kept_state": kept,
            "limit": harness.run_lm_eval(model, tokenizer, [TASK], include_path=FIXTURE, limit=15)}


def test_fixture_holds_the_toy_worlds_facts():
    assert read_docs() == toy_world_docs(), "the toy world changed: PYTHONPATH=. python tests/test_harness.py"


def test_rank0_without_process_group(local):
    result = local["full"]
    assert list(result) == [TASK]
    row = result[TASK]
    assert set(row) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "num_docs"}
    assert all(type(v) is float for k, v in row.items() if k != "num_docs")
    assert row["num_docs"] == len(read_docs()) == 96
    assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
    assert 0.4 < row["acc"] < 0.7  # knows the half it was trained on; chance on the rest
    assert round(row["acc"] * 96, 6) == int(round(row["acc"] * 96))  # a fraction of the 96 docs
    assert local["kept_state"]  # train mode and the global RNG state as they were


def test_limit_bounds_the_documents(local):
    row = local["limit"][TASK]
    assert row["num_docs"] == 15
    assert round(row["acc"] * 15, 6) == int(round(row["acc"] * 15))


def test_bad_tasks_and_modes_fail_clearly(trained, monkeypatch):
    model, tokenizer, _ = trained
    with pytest.raises(ValueError, match=r"--lm_eval_tasks: unknown task 'wpn_toy_q' \(did you mean: wpn_toy_qa"):
        harness.run_lm_eval(model, tokenizer, ["wpn_toy_q"], include_path=FIXTURE)
    where = f"it is neither among lm_eval's tasks nor in {re.escape(FIXTURE)}; .*--lm_eval_include_path"
    with pytest.raises(ValueError, match=f"unknown task 'no_such_task_xyz': {where}"):
        harness.run_lm_eval(model, tokenizer, ["no_such_task_xyz"], include_path=FIXTURE)
    with pytest.raises(ValueError, match="--lm_eval_mode"):
        harness.run_lm_eval(model, tokenizer, [TASK], mode="everywhere")
    with pytest.raises(ValueError, match="--lm_eval_tasks is empty"):
        harness.run_lm_eval(model, tokenizer, [])
    with pytest.raises(ValueError, match="--lm_eval_include_path"):
        harness.run_lm_eval(model, tokenizer, [TASK], include_path=os.path.join(FIXTURE, "missing"))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[lmeval\]"'):
        harness.run_lm_eval(model, tokenizer, [TASK], include_path=FIXTURE)


def test_two_ranks_both_modes_match_one_process(trained, local):
    work = trained[2]
    (work / "broken").mkdir()
    broken = (Path(FIXTURE) / "toy_qa.yaml").read_text().replace("task: wpn_toy_qa", "task: wpn_broken")
    (work / "broken" / "broken.yaml").write_text(broken.replace("toy_qa.jsonl", "missing.jsonl"))
    run_ranks(["tests/dist_scripts/lm_eval_modes.py", str(work)], **OFFLINE,
                  HF_DATASETS_CACHE=os.environ["HF_DATASETS_CACHE"])
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank gets the same results
    got = ranks[0]
    for mode, want in (("rank0", local["full"]), ("sharded", local["full"]), ("sharded_limit", local["limit"])):
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "num_docs"):
            assert got[mode][TASK][key] == pytest.approx(want[TASK][key], abs=1e-9), (mode, key)
    assert "lm_eval failed on a rank: rank 0: FileNotFoundError" in got["broken_rank0"]
    assert "lm_eval failed on a rank: rank 0: FileNotFoundError" in got["broken_sharded"]


if __name__ == "__main__":  # rewrite the fixture's data from the toy world
    with open(os.path.join(FIXTURE, "toy_qa.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in toy_world_docs())
