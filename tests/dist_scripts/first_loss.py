"""Under ZeRO-3 on every rank: the first LM loss of each random-init tiny spec. Rank 0 writes JSON."""
import json
import math
import sys

import torch

from wpn_dist.app import distributed, engine, models
from wpn_dist.app.config import TrainArguments

distributed.init()
results = {}
for name in ("tiny-opt", "tiny-gpt-neo"):
    tokenizer = models.load_tokenizer(name)
    model = models.load_model(name, tokenizer, init="random", seed=0)
    ds_config = engine.build_ds_config(TrainArguments(micro_batch_size=4, steps=2), 1e-4, distributed.world_size())
    eng, _, _ = engine.initialize(model, ds_config)
    generator = torch.Generator().manual_seed(distributed.rank())
    ids = torch.randint(0, len(tokenizer), (4, 32), generator=generator)
    loss = eng(input_ids=ids, labels=ids).loss
    results[name] = {"loss": distributed.all_reduce_mean(loss.item()), "ln_vocab": math.log(len(tokenizer)),
                     "stage": eng.zero_optimization_stage()}
if distributed.is_main():
    json.dump(results, open(sys.argv[-1], "w"))  # the launcher puts --local_rank first
distributed.shutdown()
distributed.exit_now()
