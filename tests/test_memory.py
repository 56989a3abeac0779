"""wpn_dist.memory: model states agree with DeepSpeed's estimators; activations, micro-batch, CLI."""
import functools
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
    return plan(**sizes(model), nodes=nodes, gpus_per_node=gpus_per_node, seq_len=2048,
                gpu_memory_gib=80, **kw)


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
    p = plan_for(model, nodes, gpus_per_node, zero_init=zero_init)
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
    r3 = row(plan_for(model, nodes, gpus_per_node, zero_init=zero_init, offload_params=False), 3, off)
    cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(
        s["num_params"], s["largest_layer_params"], gpus_per_node, nodes, offload, False, zero_init, 1.5)
    assert abs(r3["gpu_bytes"]["total"] - gpu3) <= 1 and abs(r3["cpu_per_node_bytes"]["total"] - cpu3) <= 1


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
    # ZeRO-2 keeps the 16-bit weights whole on every GPU: 2 * 65.7B bytes > 80 GiB.
    for off in ("none", "cpu"):
        r = row(p, 2, off)
        assert not r["fits"] and r["max_micro_batch"] == {"full": 0, "checkpointed": 0}
    r = row(p, 3, "none")
    free = 78 * GIB - r["gpu_bytes"]["total"]
    assert r["fits"] and r["free_for_activations_bytes"] == pytest.approx(free)
    assert r["max_micro_batch"]["checkpointed"] == math.floor(free / act["checkpointed"]) > 0
    assert r["max_micro_batch"]["full"] == math.floor(free / act["full"])
    assert [r["selected"] for r in p["rows"]] == [False, True, False, True]
    # A bigger reserve can only shrink the micro-batch.
    q = plan_for("opt-66b", 8, 8, reserve_gib=20.0)
    assert row(q, 3, "none")["max_micro_batch"]["checkpointed"] < r["max_micro_batch"]["checkpointed"]


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


def test_cli_unknown_model():
    out = run_cli("--model", "no-such-model")
    assert out.returncode == 2
    assert out.stdout == ""
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no-such-model" in err[0]
