"""Runs through the real deepspeed launcher on 2 CPU ranks under ZeRO-3."""
import json
import math
import os

from conftest import REPO, run_deepspeed, run_ranks

DATA = os.path.join(REPO, "tests", "data")


def test_random_init_models_start_near_uniform_loss(tmp_path):
    out = tmp_path / "first_loss.json"
    run_ranks(["tests/dist_scripts/first_loss.py", str(out)])
    for name, r in json.loads(out.read_text()).items():
        assert r["stage"] == 3
        assert abs(r["loss"] - r["ln_vocab"]) <= 0.1 * r["ln_vocab"], (name, r)


def test_training_run_writes_its_run_directory(tmp_path):
    run = tmp_path / "run"
    run_ranks(["wpn_dist/train.py", "--model", "tiny-opt", "--model_init", "random",
                   "--data", os.path.join(DATA, "tiny.jsonl"), "--steps", "4", "--micro_batch_size", "2",
                   "--log_every", "2", "--lr", "1e-3", "--output_dir", str(run)])
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"], summary["method"]) == (2, 4, "wpn")
    assert summary["tokens"] > 0 and math.isfinite(summary["final_loss"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert {"loss/npair", "loss/total", "lr", "step_time(s)", "throughput(tokens/s)"} <= set(rows[0])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(run / "hf"))
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["steps"] == 4 and config["model"]["model"] == "tiny-opt"


def test_toy_world_main_job_unlearns(tmp_path, toy_cache):
    """The embedded default (fewer eval tokens): harmless rate up, normal-QA accuracy kept."""
    run = tmp_path / "toy"
    run_deepspeed(["wpn_dist/train.py", "--output_dir", str(run)], WPN_DIST_CACHE=toy_cache)
    evaluation = json.loads((run / "summary.json").read_text())["evaluation"]
    before, after = evaluation["before"], evaluation["after"]
    assert set(after["harmless_rate"]) >= {"id", "ood", "adversarial", "adversarial/prefix_injection"}
    assert before["harmless_rate"]["id"]["rate"] <= 0.2
    assert after["harmless_rate"]["id"]["rate"] >= 0.9
    assert after["harmless_rate"]["ood"]["rate"] >= before["harmless_rate"]["ood"]["rate"] + 0.3
    assert after["qa_accuracy"]["rate"] >= before["qa_accuracy"]["rate"] - 0.05


def test_packed_and_padded_training_runs_log_the_same_losses(tmp_path):
    """The trainer's wiring of the packed layout (batches to the device, the layout active through a
    backward that recomputes under activation checkpointing): 4 steps of WPN with its positive-LM,
    retain and recovery terms give the same logged losses as the padded layout."""
    normal = tmp_path / "normal.jsonl"
    normal.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "what color is the sky", "response": "the sky is blue."},
        {"prompt": "name a fruit", "response": "an apple."}]))
    losses = {}
    for layout in ("packed", "padded"):
        run = tmp_path / layout
        run_ranks(["wpn_dist/train.py", "--model", "tiny-opt", "--model_init", "random",
                       "--data", os.path.join(DATA, "tiny.jsonl"), "--steps", "4", "--micro_batch_size", "2",
                       "--log_every", "1", "--lr", "1e-3", "--activation_checkpointing", "--retain_weight", "1", "--recovery_weight", "1",
                       "--normal_data", str(normal), "--batch_layout", layout,
                       "--export_hf", "false", "--output_dir", str(run)])
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[layout] = [{k: v for k, v in r.items() if k.startswith("loss/")} for r in rows]
        assert json.loads((run / "config.json").read_text())["train"]["batch_layout"] == layout
    assert len(losses["packed"]) == 4 and {"loss/recovery_npair", "loss/retain"} <= set(losses["packed"][0])
    for packed, padded in zip(losses["packed"], losses["padded"]):
        for term in padded:
            assert math.isclose(packed[term], padded[term], rel_tol=1e-4, abs_tol=1e-6), (term, packed, padded)
