"""On every rank: the tamper term's copy of the engine's weights into a whole model; then one backward of a random-init tiny model under ZeRO stage argv[-1], then the tamper
term's add_gradients with a known per-rank tensor, an SGD step at lr 1, and the gathered weights
compared with those of the same step without it. Rank 0 writes JSON to argv[-2]."""
import json
import sys

import deepspeed
import torch

from wpn_dist.app import distributed, engine, models
from wpn_dist.app.config import TrainArguments
from wpn_dist.app.tamper import TamperTerm, add_gradients
from wpn_dist.core.methods.base import TamperSettings

WEIGHT = 0.5
stage, out = int(sys.argv[-1]), sys.argv[-2]
distributed.init()
rank, world = distributed.rank(), distributed.world_size()


def known(shape, r):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + r)) * 1e-3


weights = {}
for injected in (False, True):
    tokenizer = models.load_tokenizer("tiny-opt")
    model = models.load_model("tiny-opt", tokenizer, init="random", seed=0)
    config = engine.build_ds_config(TrainArguments(micro_batch_size=2, steps=2), 1.0, world)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config.update(zero_optimization={"stage": stage}, gradient_clipping=0.0, zero_allow_untested_optimizer=True)
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                        config=config)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(rank))
    eng.backward(eng(input_ids=ids, labels=ids).loss)
    shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in eng.module.parameters()]
    if injected:
        add_gradients(eng, [known(shape, rank) for shape in shapes], WEIGHT)
    params = list(eng.module.parameters())
    if not injected:  # the copy: a model of other weights gets the engine's, whatever ZeRO holds on this rank
        term = TamperTerm(models.load_model("tiny-opt", tokenizer, init="random", seed=1),
                          TamperSettings(1.0, 1, 1e-3, 1), [], [], tokenizer.pad_token_id, seed=0)
        term._copy_weights(eng)
        with deepspeed.zero.GatheredParameters(params):
            copy_error = max(float((a - p).abs().max()) for a, p in zip(term.adversary.parameters(), params))
            copy_norm = sum(float(p.abs().sum()) for p in params)
    eng.step()
    with deepspeed.zero.GatheredParameters(params):
        weights[injected] = [p.detach().float().clone() for p in params]
    expected_shift = [WEIGHT * sum(known(shape, r) for r in range(world)) / world for shape in shapes]

errors = [float((plain - injected - shift).abs().max())
          for plain, injected, shift in zip(weights[False], weights[True], expected_shift)]
if distributed.is_main():
    json.dump({"checked": len(errors), "max_error": max(errors), "copy_error": copy_error, "copy_norm": copy_norm},
              open(out, "w"))
distributed.shutdown()
distributed.exit_now()
