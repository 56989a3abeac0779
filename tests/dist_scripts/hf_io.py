"""Hugging Face directories in and out of DeepSpeed, on every rank.

Argument (last, after the launcher's --local_rank): a work directory holding src/<model>/ (saved by
the test). For each model: load it under ZeRO-3 through HfDeepSpeedConfig + from_pretrained, record
whether it came out partitioned before deepspeed.initialize, gather every weight and compare it
with the directory's, take three optimizer steps, save the engine's logits on a fixed input, and export
it: in fp32 and bf16, and in the default dtype in shards of at most SHARD bytes; then an export whose
second shard write fails on rank 0 (every rank must raise, none hang). tiny-opt is also exported from a
ZeRO-2 engine, and from a ZeRO-3 engine trained in bf16 (the default export dtype follows training).
Rank 0 writes results.json; the test asserts.
"""
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file

from wpn_dist.app import distributed, engine as engine_lib, models
from wpn_dist.app.config import TrainArguments
from wpn_dist.app import export as export_module
from wpn_dist.app.export import export_hf

work = sys.argv[-1]  # the launcher puts --local_rank first
distributed.init()
import deepspeed  # noqa: E402  (after init: DS_ACCELERATOR is set)
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled  # noqa: E402

world = distributed.world_size()
# DeepSpeed's WarmupLR/WarmupDecayLR warm up over max(2, warmup_num_steps) steps starting from
# warmup_min_lr (0 here), so the first two optimizer steps run at lr 0: the third moves the weights.
train = TrainArguments(micro_batch_size=2, steps=2, warmup_steps=0)
probe = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(123))  # same on all ranks
# Small enough that the tiny models come out in many shards, and that the embeddings (66 KB, 131 KB in
# fp32) are single tensors bigger than a shard.
SHARD = 40_000


def export_failing_on_rank0(eng, tokenizer, out_dir):
    """export_hf with rank 0's second shard write failing: every rank must raise, and soon. Returns
    this rank's (error message or None, seconds it took)."""
    real, calls = export_module._save_shard, []

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (injected)", path)
        real(tensors, path)

    if distributed.is_main():  # only rank 0 writes; the other ranks go on gathering
        export_module._save_shard = failing
    started, message = time.time(), None
    try:
        export_hf(eng, tokenizer, out_dir, max_shard_size=SHARD)
    except RuntimeError as e:
        message = str(e)
    finally:
        export_module._save_shard = real
    return message, time.time() - started


def step_and_probe(eng, out):
    """Three optimizer steps on this rank's random tokens, then the logits on ``probe`` (rank 0 saves)."""
    eng.train()
    generator = torch.Generator().manual_seed(1000 + distributed.rank())
    for _ in range(3):
        ids = torch.randint(0, 259, (2, 16), generator=generator)
        eng.backward(eng(input_ids=ids, labels=ids).loss)
        eng.step()
    eng.eval()
    with torch.no_grad():
        logits = eng(input_ids=probe).logits.float()
    # A forward with no backward after it leaves every ZeRO-3 weight gathered (DeepSpeed releases
    # them in backward); release them so that export_hf has partitioned weights to gather.
    eng.empty_partition_cache()
    if distributed.is_main():
        os.makedirs(out, exist_ok=True)
        torch.save({"input_ids": probe, "logits": logits}, os.path.join(out, "logits.pt"))


results = {}
for name in ("tiny-opt", "tiny-gpt-neo"):
    src, out = os.path.join(work, "src", name), os.path.join(work, "out", name)
    tokenizer = models.load_tokenizer(src)
    ds_config = engine_lib.build_ds_config(train, 1e-3, world)
    # No persistent (always gathered) small parameters: the tiny models' weights would all be, and the
    # export must gather parameters that are partitioned between forwards.
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # alive while from_pretrained runs: zero.Init loading
    zero3_during_load = is_deepspeed_zero3_enabled()
    model = models.load_model(src, tokenizer, init="pretrained")
    del hf_ds_config  # later random-init models must not be built under zero.Init
    r = {"zero3_during_load": zero3_during_load, "zero3_after_del": is_deepspeed_zero3_enabled()}

    # 1. Partitioned as it loaded: before deepspeed.initialize every parameter is a ZeRO-3 parameter
    #    whose full data is released and of which this rank holds only its slice.
    not_partitioned = [n for n, p in model.named_parameters()
                       if not (hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE
                               and p.numel() == 0 and p.ds_tensor.numel() < p.ds_numel)]
    r["not_partitioned"] = sorted({n for names in distributed.gather_objects(not_partitioned) for n in names})
    r["num_params"] = sum(1 for _ in model.named_parameters())
    r["local_numel"] = distributed.all_reduce_mean(sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_id")))
    r["full_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

    eng, _, _ = engine_lib.initialize(model, ds_config)
    r["stage"] = eng.zero_optimization_stage()

    # 2. After initialize, every gathered weight equals the directory's, exactly.
    source = load_file(os.path.join(src, "model.safetensors"))
    mismatched, absent = [], []
    for n, p in eng.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if n not in source:
                absent.append(n)
            elif not torch.equal(p.detach().cpu(), source[n]):
                mismatched.append(n)
    r["mismatched"], r["absent_from_source"] = mismatched, absent
    r["source_keys_not_params"] = sorted(set(source) - {n for n, _ in eng.module.named_parameters()})

    # 3. Step, logits, export (collectives: every rank).
    step_and_probe(eng, out)
    first = next(n for n, _ in eng.module.named_parameters())
    with deepspeed.zero.GatheredParameters([dict(eng.module.named_parameters())[first]]):
        r["moved_by_step"] = (dict(eng.module.named_parameters())[first].detach() - source[first]).abs().max().item()
    r["gathered_before_export"] = [n for n, p in eng.module.named_parameters()
                                   if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
    # The trained weights, gathered one by one without export_hf: what its files must hold.
    trained = {}
    for n, p in eng.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            trained[n] = p.detach().cpu().clone()
    if distributed.is_main():
        torch.save(trained, os.path.join(out, "weights.pt"))
    export_hf(eng, tokenizer, os.path.join(out, "fp32"), dtype=torch.float32)
    export_hf(eng, tokenizer, os.path.join(out, "bf16"), dtype=torch.bfloat16)
    export_hf(eng, tokenizer, os.path.join(out, "fp32"), dtype=torch.float32)  # again: replaces it
    export_hf(eng, tokenizer, os.path.join(out, "sharded"), max_shard_size=SHARD)  # default dtype: fp32
    r["failure"] = distributed.gather_objects(export_failing_on_rank0(eng, tokenizer, os.path.join(out, "failed")))
    # The ranks are still in step after the failure: the next export works.
    export_hf(eng, tokenizer, os.path.join(out, "after_failure"), max_shard_size=SHARD)
    results[name] = r
    del eng, model

# ZeRO-2: the module is whole on every rank; export takes rank 0's copy.
name, out = "tiny-opt", os.path.join(work, "out", "tiny-opt-zero2")
tokenizer = models.load_tokenizer(os.path.join(work, "src", name))
model = models.load_model(name, tokenizer, init="random", seed=1)
train.ds_config = "zero2"
eng, _, _ = engine_lib.initialize(model, engine_lib.build_ds_config(train, 1e-3, world))
step_and_probe(eng, out)
export_hf(eng, tokenizer, os.path.join(out, "fp32"), dtype=torch.float32)
results["tiny-opt-zero2"] = {"stage": eng.zero_optimization_stage()}
del eng, model

# ZeRO-3 trained in bf16: the default export writes bf16 (the training dtype).
train.ds_config, train.precision = "zero3", "bf16"
model = models.load_model(name, tokenizer, init="random", dtype=torch.bfloat16, seed=1)
eng, _, _ = engine_lib.initialize(model, engine_lib.build_ds_config(train, 1e-3, world))
export_hf(eng, tokenizer, os.path.join(work, "out", "tiny-opt-bf16", "sharded"), max_shard_size=SHARD)
results["tiny-opt-bf16"] = {"stage": eng.zero_optimization_stage()}

if distributed.is_main():
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
distributed.shutdown()
distributed.exit_now()
