"""One WPN forward/backward under ZeRO-3 with activation checkpointing, per model; saves the global
loss and the full parameter gradients (rank 0). Usage: parity.py MODELS ROWS_PER_RANK OUT, where MODELS
is comma-separated and ROWS_PER_RANK e.g. "3,2": rank r takes the next ROWS[r] examples of the same
global batch."""
import sys

import torch
from deepspeed.utils import safe_get_full_grad

from wpn_dist.app import distributed, engine, models
from wpn_dist.app.config import TrainArguments
from wpn_dist.app.data import encode_examples, pack_batch, read_jsonl
from wpn_dist.core import packed_attention
from wpn_dist.core.methods import build_method, method_class

models_arg, rows_arg, out_path = sys.argv[-3:]
distributed.init()
rows = [int(r) for r in rows_arg.split(",")]
assert len(rows) == distributed.world_size(), (rows, distributed.world_size())
start = sum(rows[:distributed.rank()])
# Both sides trained (frozen_side none): the gradients flow through the gathered negatives too.
method = build_method("wpn", method_class("wpn").Options(positive_lm_weight=0.0, recovery_cuts=0, temperature=0.5,
                                                         frozen_side="none"))
results = {}
for model_name in models_arg.split(","):
    tokenizer = models.load_tokenizer(model_name)
    examples, _, _ = encode_examples(read_jsonl("tests/data/tiny.jsonl"), tokenizer, "Q: {prompt} A:", 128)
    mine = examples[start:start + rows[distributed.rank()]]
    model = models.load_model(model_name, tokenizer, init="random", seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    packed_attention.install(model)
    train = TrainArguments(micro_batch_size=max(rows), steps=2, ds_config="zero3")
    eng, _, _ = engine.initialize(model, engine.build_ds_config(train, 1e-3, distributed.world_size()))
    assert eng.zero_optimization_stage() == 3
    eng.train()
    batch = pack_batch(mine, tokenizer.pad_token_id)
    terms = method.loss_terms(eng, batch)
    with packed_attention.active(batch["layout"]):
        eng.backward(terms["loss/total"])
    grads = {}
    for name, param in eng.module.named_parameters():  # collective under ZeRO-3: every rank, same order
        grads[name] = safe_get_full_grad(param).detach().clone().float()
    results[model_name] = {"loss": distributed.all_reduce_mean(terms["loss/total"].item()), "grads": grads}
if distributed.is_main():
    torch.save(results, out_path)
distributed.shutdown()
distributed.exit_now()
