"""wpn_dist.memory: model states agree with DeepSpeed's estimators; activations, micro-batch, CLI."""
import functools
import json
import math
import os
import subprocess
import sys

import pytest

from wpn_dist.bench.memory import GIB, activation_bytes_per_sequence, count_model, describe_model, plan
from wpn_dist.app.models import MODEL_SPECS, build_config, count_parameters

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGIES = [(1, 1), (1, 8), (8, 8)]  # (nodes, gpus_per_node)


@functools.lru_cache(maxsize=None)
def sizes(model):
    return describe_model(model)


def plan_for(model, nodes, gpus_per_node, **kw):
    """The plan of the spec ``model``; a size in ``kw`` (e.g. ``num_params`` of a model built or loaded)
    replaces the spec's."""
    model_sizes = {name: kw.pop(name, value) for name, value in sizes(model).items()}
    return plan(**model_sizes, nodes=nodes, gpus_per_node=gpus_per_node, seq_len=2048, gpu_memory_gib=80, **kw)


def row(p, stage, offload):
    return next(r for r in p["rows"] if r["stage"] == stage and r["offload"] == offload)


@pytest.mark.parametrize("model", ["opt-1.3b", "opt-66b", "gpt-neox-20b"])
@pytest.mark.parametrize("nodes,gpus_per_node", TOPOLOGIES)
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("zero_init", [True, False])
def test_model_states_match_deepspeed_estimators(model, nodes, gpus_per_node, offload, zero_init):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    s = sizes(model)
    # DeepSpeed's estimators count one engine with its optimizer: no frozen model, no tamper copy.
    p = plan_for(model, nodes, gpus_per_node, zero_init=zero_init, frozen_model=False)
    off = "cpu" if offload else "none"

    cpu2, gpu2 = estimate_zero2_model_states_mem_needs(s["num_params"], gpus_per_node, nodes, offload, 1.5)
    r2 = row(p, 2, off)
    cpu3, gpu3, largest3 = estimate_zero3_model_states_mem_needs(
        s["num_params"], s["largest_layer_params"], gpus_per_node, nodes, offload, True, zero_init, 1.5)
    r3 = row(p, 3, off)
    for r, gpu, cpu in ((r2, gpu2, cpu2), (r3, gpu3, cpu3)):
        g, c = r["gpu_bytes"], r["cpu_per_node_bytes"]
        # The parts add up to the totals; DeepSpeed truncates to whole bytes.
        assert g["total"] == pytest.approx(g["params"] + g["grads"] + g["optim"] + g["gather"])
        assert abs(g["total"] - gpu) <= 1
        assert abs(c["total"] - cpu) <= 1
        assert r["gpu_per_node_bytes"]["total"] == pytest.approx(g["total"] * gpus_per_node)
    assert r3["gpu_bytes"]["gather"] == largest3
    assert r2["gpu_bytes"]["gather"] == 0
    # ZeRO-3 offloading the optimizer only: the 16-bit weights stay partitioned on the GPUs.
    r3 = row(plan_for(model, nodes, gpus_per_node, zero_init=zero_init, offload_params=False, frozen_model=False), 3, off)
    cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(
        s["num_params"], s["largest_layer_params"], gpus_per_node, nodes, offload, False, zero_init, 1.5)
    assert abs(r3["gpu_bytes"]["total"] - gpu3) <= 1 and abs(r3["cpu_per_node_bytes"]["total"] - cpu3) <= 1


@pytest.mark.parametrize("stage", [3, 2])
def test_the_frozen_model_is_counted_as_deepspeed_holds_it(tmp_path, stage):
    """The frozen original model's engine, built on 2 ranks as the trainer builds it: under ZeRO-3 each
    rank holds a partition, under ZeRO-2 (a stage-0 engine) the whole model; the plan's 16-bit bytes
    per GPU are those elements times 2 (DeepSpeed pads each partition to the ranks: a few elements)."""
    from conftest import run_ranks
    out = tmp_path / "held.json"
    run_ranks(["tests/dist_scripts/frozen_partition.py", str(out), str(stage)])
    held = json.loads(out.read_text())
    # The loaded model's own count (its embedding fits the tokenizer, not the spec's vocabulary).
    p = plan_for("tiny-opt", 1, 2, num_params=held["total"])
    planned = row(p, stage, "none")["gpu_bytes"]["frozen"] / 2
    for elements in held["held"]:
        assert 0 <= elements - planned <= held["tensors"], (held, planned)
    assert row(plan_for("tiny-opt", 1, 2, frozen_model=False), stage, "none")["gpu_bytes"]["frozen"] == 0
    if stage == 3:  # offloaded with the weights: on the host, a node's share
        r = row(p, 3, "cpu")
        assert r["gpu_bytes"]["frozen"] == 0 and r["cpu_per_node_bytes"]["frozen"] == 2 * held["total"]


def test_the_tamper_copy_is_counted_as_torch_holds_it():
    """The tamper term's copy after one AdamW step, in 16 bits as a bf16 run loads it: its weights,
    gradients and optimizer state (step counters aside) are the plan's bytes, on every GPU."""
    import torch
    from wpn_dist.app import models
    tokenizer = models.load_tokenizer("tiny-opt")
    copy = models.load_model("tiny-opt", tokenizer, init="random", seed=0, dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(copy.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, len(tokenizer), (2, 8))
    copy(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    params = list(copy.parameters())
    held = sum(t.numel() * t.element_size() for p in params for t in (p, p.grad))
    held += sum(v.numel() * v.element_size() for state in optimizer.state.values() for k, v in state.items()
                if k != "step")
    count = sum(p.numel() for p in params)
    for nodes, gpus in ((1, 2), (2, 8)):
        p = plan_for("tiny-opt", nodes, gpus, num_params=count, tamper_copy=True)
        assert {row(p, s, o)["gpu_bytes"]["tamper"] for s in (2, 3) for o in ("none", "cpu")} == {held}
    assert row(plan_for("tiny-opt", 1, 2), 3, "none")["gpu_bytes"]["tamper"] == 0


def test_counts_match_models_and_deepspeed():
    spec = MODEL_SPECS["opt-1.3b"]
    assert sizes("opt-1.3b")["num_params"] == count_parameters(spec)
    # opt-66b: the embedding (vocab x hidden) is the largest single module.
    assert sizes("opt-66b")["largest_layer_params"] == 50272 * 9216
    # On a real (non-meta) model, count_model agrees with DeepSpeed's own helper, tied weights included.
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM
    net = AutoModelForCausalLM.from_config(build_config(MODEL_SPECS["tiny-opt"]))
    assert count_model(net) == model_to_params(net)


def test_local_model_dir(tmp_path):
    build_config(MODEL_SPECS["tiny-opt"]).save_pretrained(tmp_path)
    assert describe_model(str(tmp_path)) == describe_model("tiny-opt")


def test_activation_formula():
    s, L, h, a, V = 2048, 64, 9216, 72, 50272
    per_layer = s * h * (34 + 5 * a * s / h)  # Korthikanti et al. 2022, eq. 1, b = 1
    logits = s * V * 4
    full = activation_bytes_per_sequence(s, L, h, a, V, checkpointing=False)
    ckpt = activation_bytes_per_sequence(s, L, h, a, V, checkpointing=True)
    assert full == int(L * per_layer + logits)
    assert ckpt == int(L * 2 * s * h + per_layer + logits)
    assert ckpt < full


def test_micro_batch_and_not_fitting():
    p = plan_for("opt-66b", 8, 8, offload="cpu", reserve_gib=2.0)
    act = p["activation_bytes_per_sequence"]
    # The micro-batch counts examples, as the trainer's --micro_batch_size: 1 positive + K=1 negative.
    assert p["sequences_per_example"] == 2 and p["inputs"]["negatives"] == 1
    assert p["activation_bytes_per_example"] == {m: 2 * act[m] for m in act}
    # ZeRO-2 keeps the 16-bit weights whole on every GPU: 2 * 65.7B bytes > 80 GiB.
    for off in ("none", "cpu"):
        r = row(p, 2, off)
        assert not r["fits"] and r["max_micro_batch"] == {"full": 0, "checkpointed": 0}
    r = row(p, 3, "none")
    free = 78 * GIB - r["gpu_bytes"]["total"]
    assert r["fits"] and r["free_for_activations_bytes"] == pytest.approx(free)
    assert r["max_micro_batch"]["checkpointed"] == math.floor(free / (2 * act["checkpointed"])) > 0
    assert r["max_micro_batch"]["full"] == math.floor(free / (2 * act["full"]))
    assert r["max_micro_batch_sequences"] == {m: 2 * n for m, n in r["max_micro_batch"].items()}
    assert [r["selected"] for r in p["rows"]] == [False, True, False, True]
    # A bigger reserve can only shrink the micro-batch.
    q = plan_for("opt-66b", 8, 8, reserve_gib=20.0)
    assert row(q, 3, "none")["max_micro_batch"]["checkpointed"] < r["max_micro_batch"]["checkpointed"]


def test_micro_batch_counts_examples_of_one_plus_k_sequences():
    # More negatives per example: fewer examples fit, the model states stay the same.
    by_k = {k: row(plan_for("opt-1.3b", 1, 8, negatives=k), 3, "none") for k in (0, 1, 3)}
    free = by_k[0]["free_for_activations_bytes"]
    act = plan_for("opt-1.3b", 1, 8)["activation_bytes_per_sequence"]["checkpointed"]
    for k, r in by_k.items():
        assert r["gpu_bytes"] == by_k[0]["gpu_bytes"]
        assert r["max_micro_batch"]["checkpointed"] == math.floor(free / ((1 + k) * act))
        assert r["max_micro_batch_sequences"]["checkpointed"] == (1 + k) * r["max_micro_batch"]["checkpointed"]
    assert by_k[0]["max_micro_batch"]["checkpointed"] > by_k[1]["max_micro_batch"]["checkpointed"] \
        > by_k[3]["max_micro_batch"]["checkpointed"]
    with pytest.raises(ValueError, match="negatives"):
        plan_for("opt-1.3b", 1, 8, negatives=-1)


def test_cli_options_hyphens_underscores_and_config(tmp_path):
    from wpn_dist.bench.memory import parse_args
    documented = parse_args(["--model", "opt-66b", "--nodes", "8", "--gpus-per-node", "8", "--offload", "cpu",
                             "--gpu-memory-gib", "40", "--reserve-gib", "3", "--seq-len", "256",
                             "--precision", "fp16", "--no-zero-init"])
    assert (documented.gpus_per_node, documented.gpu_memory_gib, documented.reserve_gib, documented.seq_len,
            documented.zero_init, documented.negatives) == (8, 40.0, 3.0, 256, False, 1)
    same = parse_args(["--model", "opt-66b", "--nodes", "8", "--gpus_per_node", "8", "--offload", "cpu",
                       "--gpu_memory_gib", "40", "--reserve_gib", "3", "--seq_len", "256", "--precision", "fp16",
                       "--no_zero_init"])
    assert same == documented
    config = tmp_path / "plan.yaml"
    config.write_text("model: opt-1.3b\ngpus-per-node: 4\nnegatives: 2\nzero_init: false\n")
    options = parse_args(["--config", str(config), "--negatives", "3"])
    assert (options.model, options.gpus_per_node, options.negatives, options.zero_init) == ("opt-1.3b", 4, 3, False)


def run_cli(*args):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "wpn_dist.memory", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_example():
    out = run_cli("--model", "opt-66b", "--nodes", "8", "--gpus-per-node", "8", "--offload", "cpu")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for label in ("ZeRO-2 on GPU", "ZeRO-2 offload", "ZeRO-3 on GPU", "ZeRO-3 offload"):
        assert any(label in line for line in lines), label
    assert any(line.startswith("* ZeRO-3 offload") for line in lines)
    assert any(line.startswith("  ZeRO-3 on GPU") for line in lines)
    assert "do not fit" in out.stdout  # ZeRO-2 on 80 GiB
    # The micro-batch is in examples, with the sequences they imply.
    assert "examples per GPU per forward pass" in out.stdout and "1 + K = 2 sequence(s)" in out.stdout
    p = plan_for("opt-66b", 8, 8, offload="cpu")
    mb = row(p, 3, "cpu")["max_micro_batch"]["checkpointed"]
    assert any(line.startswith("* ZeRO-3 offload") and line.endswith(f"{mb} ({2 * mb})") for line in lines)


def test_cli_prints_the_disk_a_run_needs():
    # A bf16 ZeRO checkpoint holds the fp32 master weights and both Adam moments (12 B) and the bf16
    # weights (2 B) of every parameter; the export, the bf16 weights.
    out = run_cli("--model", "opt-66b", "--keep_checkpoints", "3")
    assert out.returncode == 0, out.stderr
    from wpn_dist.app.models import MODEL_SPECS, count_parameters
    n = count_parameters(MODEL_SPECS["opt-66b"])
    one = n * 14 / 2**30
    assert f"one checkpoint {one:,.1f} GiB" in out.stdout
    assert f"3 kept + 1 being written = {4 * one:,.1f} GiB" in out.stdout
    assert f"export {n * 2 / 2**30:,.1f} GiB" in out.stdout


def test_cli_unknown_model():
    out = run_cli("--model", "no-such-model")
    assert out.returncode == 2
    assert out.stdout == ""
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no-such-model" in err[0]


@pytest.mark.parametrize("argv,expected", [
    ([], "the following arguments are required: --model"),
    (["--model", "opt-1.3b", "--nodes", "0"], "--nodes must be at least 1, got 0"),
    (["--model", "opt-1.3b", "--seq-len", "0"], "--seq_len must be at least 1, got 0"),
    (["--model", "opt-1.3b", "--negatives", "-1"], "--negatives must be >= 0, got -1"),
    (["--model", "opt-1.3b", "--offload", "nvme"], "invalid choice: 'nvme'"),
    (["--model", "opt-1.3b", "--micro-batch-size", "4"], "unknown option(s)"),
])
def test_cli_bad_options_are_one_line(argv, expected, capsys):
    from wpn_dist.bench.memory import main
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
