"""Hugging Face directories in and out of DeepSpeed on 2 CPU ranks: from_pretrained under ZeRO-3 loads
partitioned and exact; export_hf writes a directory that plain transformers loads and that computes
what the engine computed, shard by shard, in the training dtype unless asked otherwise, and a write
that fails on rank 0 ends the export on every rank. One launcher run (tests/dist_scripts/hf_io.py)
does the distributed part."""
import json
import os

import pytest
import torch

from conftest import run_ranks

MODELS = ("tiny-opt", "tiny-gpt-neo")
SHARD = 40_000  # the dist script's max_shard_size


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Save each tiny model (random weights) as a local HF directory, then run the dist script once."""
    from wpn_dist.app import models
    work = tmp_path_factory.mktemp("hf_io")
    for name in MODELS:
        tokenizer = models.load_tokenizer(name)
        model = models.load_model(name, tokenizer, init="random", seed=7)
        model.save_pretrained(work / "src" / name)
        tokenizer.save_pretrained(work / "src" / name)
    run_ranks(["tests/dist_scripts/hf_io.py", str(work)])
    return work, json.loads((work / "results.json").read_text())


@pytest.mark.parametrize("name", MODELS)
def test_zero3_from_pretrained_loads_partitioned_and_exact(run, name):
    r = run[1][name]
    assert r["zero3_during_load"] and not r["zero3_after_del"]
    assert r["num_params"] > 0 and r["not_partitioned"] == []
    assert r["local_numel"] <= r["full_numel"] / 2 + r["num_params"]  # each rank holds ~half
    assert r["stage"] == 3
    assert r["mismatched"] == [] and r["absent_from_source"] == []
    assert r["source_keys_not_params"] == []  # no weight of the directory left unchecked


def load_export(path, dtype=None):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def logits_of(model, reference):
    with torch.no_grad():
        return model(input_ids=reference["input_ids"]).logits.float()


@pytest.mark.parametrize("name", MODELS + ("tiny-opt-zero2",))
def test_fp32_export_computes_what_the_engine_computed(run, name):
    from transformers import AutoTokenizer
    work, results = run
    if name in results and "moved_by_step" in results[name]:
        assert results[name]["moved_by_step"] > 0  # the export is of trained, not source, weights
        assert results[name]["gathered_before_export"] == []  # export_hf had to gather every weight
    out = work / "out" / name
    reference = torch.load(out / "logits.pt")
    model = load_export(out / "fp32")
    assert model.dtype == torch.float32
    assert json.loads((out / "fp32" / "config.json").read_text())["dtype"] == "float32"
    if name.startswith("tiny-opt"):  # tied lm_head = embed_tokens: stored once, tied again on load
        assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits_of(model, reference), reference["logits"], atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out / "fp32")
    assert tokenizer.decode(tokenizer("hello world")["input_ids"], skip_special_tokens=True) == "hello world"
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary directories left behind


@pytest.mark.parametrize("name", MODELS)
def test_bf16_export_is_16_bit_and_close(run, name):
    out = run[0] / "out" / name
    reference = torch.load(out / "logits.pt")
    assert json.loads((out / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_export(out / "bf16")  # dtype from config.json
    assert model.dtype == torch.bfloat16
    got, want = logits_of(model, reference), reference["logits"]
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()
    # In fp32 the bf16 weights are only rounded: closer still.
    got32 = logits_of(load_export(out / "bf16", dtype=torch.float32), reference)
    assert (got32 - want).abs().max().item() <= 0.02 * want.abs().max().item()


def shard_tensors(directory) -> dict:
    """file name -> {key: tensor} of every safetensors file in ``directory``."""
    from safetensors.torch import load_file
    return {f: load_file(directory / f) for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")}


@pytest.mark.parametrize("name", MODELS)
def test_sharded_export_has_a_complete_index_and_exact_weights(run, name):
    from safetensors.torch import load_file
    work, results = run
    out = work / "out" / name
    directory = out / "sharded"
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    files = shard_tensors(directory)
    assert len(files) > 2 and "model.safetensors" not in files
    assert sorted(files) == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    # Every key is in the index, under the file that holds it, and the keys are save_pretrained's
    # (src/ was written by save_pretrained: tied lm_head.weight left out the same way).
    assert set(index["weight_map"]) == set(load_file(work / "src" / name / "model.safetensors"))
    assert {k: f for f, tensors in files.items() for k in tensors} == index["weight_map"]
    sizes = {f: sum(t.numel() * t.element_size() for t in tensors.values()) for f, tensors in files.items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for f, size in sizes.items():
        assert size <= SHARD or len(files[f]) == 1, (f, size)  # only a single tensor may exceed the limit
    assert any(size > SHARD for size in sizes.values())  # the embeddings are such tensors
    # The default dtype is the training dtype (fp32 here), in the files themselves.
    assert {t.dtype for tensors in files.values() for t in tensors.values() if t.is_floating_point()} == {torch.float32}
    assert json.loads((directory / "config.json").read_text())["dtype"] == "float32"
    trained = torch.load(out / "weights.pt")  # gathered by the dist script itself, not by export_hf
    for f, tensors in files.items():
        for key, tensor in tensors.items():
            assert torch.equal(tensor, trained[key]), key  # exact
    reference = torch.load(out / "logits.pt")
    model = load_export(directory)
    # The engine's own forward (same weights; the kernels may differ in the last bit).
    torch.testing.assert_close(logits_of(model, reference), reference["logits"], atol=1e-6, rtol=1e-6)
    assert {"tokenizer.json", "generation_config.json"} <= set(os.listdir(directory))


def test_default_export_of_a_bf16_engine_is_bf16(run):
    directory = run[0] / "out" / "tiny-opt-bf16" / "sharded"
    assert run[1]["tiny-opt-bf16"]["stage"] == 3
    files = shard_tensors(directory)
    assert len(files) > 2
    assert {t.dtype for tensors in files.values() for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_export(directory).dtype == torch.bfloat16


@pytest.mark.parametrize("name", MODELS)
def test_a_write_failing_on_rank_0_raises_on_every_rank_without_a_hang(run, name):
    work, results = run
    failure = results[name]["failure"]  # per rank: (message, seconds)
    assert len(failure) == 2
    for message, seconds in failure:
        assert message is not None and "failed on rank 0" in message and "No space left on device" in message
        assert seconds < 30  # every rank stopped at the failed shard, not at a collective timeout
    out = work / "out" / name
    assert not (out / "failed").exists()
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # its temporary directory is removed
    load_export(out / "after_failure")  # and the ranks were still in step for the next export


def test_export_command_writes_the_newest_checkpoint_of_a_run(tmp_path):
    """A 2-rank run without its own export, then `python -m wpn_dist.export` under the launcher: the
    export holds the newest checkpoint's weights (DeepSpeed's zero_to_fp32 reads them from the
    checkpoint's fp32 master partitions, without export_hf) and the run directory keeps its record."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from conftest import REPO
    run_dir = tmp_path / "run"
    run_ranks(["wpn_dist/train.py", "--model", "tiny-opt", "--model_init", "random",
                   "--data", os.path.join(REPO, "tests", "data", "tiny.jsonl"), "--steps", "3",
                   "--micro_batch_size", "2", "--lr", "1e-3", "--warmup_steps", "0", "--log_every", "1",
                   "--save_every", "2", "--export_hf", "false", "--output_dir", str(run_dir)])
    assert not (run_dir / "hf").exists()
    record = {f: (run_dir / f).read_bytes() for f in ("summary.json", "config.json", "metrics.jsonl")}
    out = tmp_path / "exported"
    result = run_ranks(["--module", "wpn_dist.export", str(run_dir), "--out", str(out), "--max_shard_size", "100KB"])
    assert "step00000003" in result.stdout and "wpn_dist: exported" in result.stdout
    assert {f: (run_dir / f).read_bytes() for f in record} == record  # summary.json is the run's, not a 0-step one's
    root = run_dir / "checkpoints"
    assert sorted(t for t in os.listdir(root) if t.startswith("step")) == ["step00000002", "step00000003"]
    assert not (run_dir / "hf").exists()  # --out
    model = load_export(out)
    assert model.dtype == torch.float32  # --dtype auto: the training dtype
    want = get_fp32_state_dict_from_zero_checkpoint(str(root), tag="step00000003")
    files = shard_tensors(out)
    assert len(files) > 2 and (out / "model.safetensors.index.json").is_file()  # --max_shard_size
    got = {key: tensor for tensors in files.values() for key, tensor in tensors.items()}
    assert got and set(got) <= set(want)
    for key, tensor in got.items():
        assert torch.equal(tensor, want[key]), key
