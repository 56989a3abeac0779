"""One optimizer step's loss and full parameter gradients for every method, on tiny OPT under ZeRO-3
with activation checkpointing, for the same 4 examples split as LAYOUT: "1x4" (one rank, one
micro-batch of 4), "2x2" (two ranks of 2) or "1x2acc2" (one rank, two accumulated micro-batches of 2).
Usage: invariance.py LAYOUT OUT [MODEL [BATCH_LAYOUT]] (rank 0 saves {method: {"loss", "grads"}}); MODEL
tiny-opt (default) or tiny-gpt-neo, BATCH_LAYOUT packed (default) or padded."""
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_get_local_grad, safe_set_local_grad

from wpn_dist.app import distributed, engine, models
from wpn_dist.app.config import TrainArguments
from wpn_dist.app.data import BatchMaker, encode_examples, read_jsonl
from wpn_dist.core import packed_attention
from wpn_dist.core.methods import build_method, method_class, method_names

NORMAL = [{"prompt": "what color is the sky", "response": "the sky is blue."},
          {"prompt": "name a fruit", "response": "an apple."},
          {"prompt": "count to three", "response": "one two three."}]
PLANS = {"1x4": [[[0, 1, 2, 3]]], "2x2": [[[0, 1], [2, 3]]], "1x2acc2": [[[0, 1]], [[2, 3]]]}
WPN = method_class("wpn").Options
# Every registered method with its defaults, WPN with its auxiliary terms on, and WPN with local negatives.
METHODS = {name: build_method(name) for name in method_names()}
METHODS["wpn"] = build_method("wpn", WPN(positive_lm_weight=1.0, retain_weight=1.0, temperature=0.5))
# Both sides of the N-pair term trained: the gathered negatives carry gradients (the default's are the frozen model's).
METHODS["wpn-trained-sides"] = build_method("wpn", WPN(frozen_side="none", positive_lm_weight=1.0, retain_weight=1.0,
                                                       temperature=0.5))
METHODS["wpn-local-negatives"] = build_method("wpn", WPN(global_negatives=False, positive_lm_weight=0.5,
                                                         retain_weight=1.0, retain_loss="kl"))
METHODS["wpn-recovery"] = build_method("wpn", WPN(global_negatives=False, recovery_cuts=2, recovery_weight=1.0,
                                                  positive_lm_weight=1.0, retain_weight=1.0))
# WPN's regulariser and a frozen side, on random recovery depths and with prompt noise (both drawn per
# example and step: the same whatever the split).
METHODS["wpn-retention"] = build_method("wpn", WPN(global_negatives=False, recovery_cuts=2, recovery_weight=1.0,
                                                   retention_weight=1.0, frozen_side="anchor", positive_lm_weight=1.0,
                                                   retain_weight=0.0, prompt_noise=0.4))
METHODS["rr"].progress = 0.5  # half-way through its schedule: both terms weigh

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
layout, out_path = args[:2]
model_name = args[2] if len(args) > 2 else "tiny-opt"
batch_layout = args[3] if len(args) > 3 else "packed"
plan = PLANS[layout]
distributed.init()
assert len(plan[0]) == distributed.world_size(), (layout, distributed.world_size())
tokenizer = models.load_tokenizer(model_name)
examples = read_jsonl("tests/data/tiny.jsonl")
encoded, _, _ = encode_examples(examples, tokenizer, "Q: {prompt} A:", 128)
train = TrainArguments(micro_batch_size=len(plan[0][0]), gradient_accumulation_steps=len(plan), steps=2,
                       ds_config="zero3")
# lr 0: the step that closes each method's accumulation window leaves the weights as they are (the
# gradients are zeroed below), so one engine serves every method, each gradient taken at the same weights.
ds_config = engine.build_ds_config(train, 0.0, distributed.world_size())


def make_model(seed: int = 0):
    """The tiny model, GPT-Neo with a local-attention window (16) shorter than these sequences."""
    if model_name != "tiny-gpt-neo":
        return models.load_model(model_name, tokenizer, init="random", seed=seed)
    from transformers import AutoModelForCausalLM
    config = models.build_config(models.MODEL_SPECS[model_name], vocab_size=len(tokenizer), tokenizer=tokenizer)
    config.window_size = 16
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def full_weights(eng) -> dict:
    """Every parameter in full (collective under ZeRO-3: every rank, same order)."""
    return {pname: safe_get_full_fp32_param(param).detach().clone() for pname, param in eng.module.named_parameters()}


reference_model = make_model(seed=1)  # a frozen model other than the trained one: every term has a gradient
packed_attention.install(reference_model)
reference = engine.initialize_reference(reference_model, ds_config)
model = make_model()
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.config.use_cache = False
packed_attention.install(model)
eng, _, _ = engine.initialize(model, ds_config)
eng.train()
initial = full_weights(eng)
results = {}
for name, method in METHODS.items():
    maker = BatchMaker(encoded, examples, tokenizer, "Q: {prompt} A:", 128, method.row_groups(), NORMAL, seed=0,
                       layout=batch_layout, **method.batch_options())
    batches = maker.step_batches(plan, step=1, rank=distributed.rank())
    loss = 0.0
    for micro, batch in enumerate(batches):
        batch.pop("num_tokens")
        terms = method.loss_terms(eng, batch, reference if method.needs_reference() else None)
        with packed_attention.active(batch["layout"]):  # activation checkpointing recomputes with it
            eng.backward(terms["loss/total"])
        loss += terms["loss/total"].item() / len(batches)
        if micro < len(batches) - 1:
            eng.step()  # inside the accumulation window: counts the micro-step, leaves the weights
    grads = {}
    for pname, param in eng.module.named_parameters():  # collective under ZeRO-3: every rank, same order
        grads[pname] = safe_get_full_grad(param).detach().clone().float()
    results[name] = {"loss": distributed.all_reduce_mean(loss), "grads": grads}
    eng.step()  # closes the window: at lr 0 the weights stay
    # ZeRO-3 keeps a gradient partition that a backward does not write (RMU's loss never reaches the
    # layers above its own): zero them all, as a new engine has them.
    for param in eng.module.parameters():
        safe_set_local_grad(param, torch.zeros_like(safe_get_local_grad(param)))
final = full_weights(eng)
assert all(torch.equal(initial[k], final[k]) for k in initial), "the weights moved between methods"
if distributed.is_main():
    torch.save(results, out_path)
distributed.shutdown()
distributed.exit_now()
