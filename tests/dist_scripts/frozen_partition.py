"""On every rank: the frozen original model as wpn_dist builds its second engine
(engine.initialize_reference) from a tiny model, under ZeRO stage argv[-1] (the run's config, as the
trainer builds it). Rank 0 writes to argv[-2] the elements each rank holds and the model's own count."""
import json
import sys

import torch

from wpn_dist.app import distributed, engine, models
from wpn_dist.app.config import TrainArguments

stage, out = int(sys.argv[-1]), sys.argv[-2]
distributed.init()
tokenizer = models.load_tokenizer("tiny-opt")
model = models.load_model("tiny-opt", tokenizer, init="random", seed=0)
total = sum(p.numel() for p in model.parameters())
config = engine.build_ds_config(TrainArguments(micro_batch_size=2, steps=2), 1.0, distributed.world_size())
config["zero_optimization"] = {"stage": stage}
reference = engine.initialize_reference(model, config)
# Under ZeRO-3 a parameter's own elements on this rank are its partition (ds_tensor); otherwise the tensor.
held = sum(getattr(p, "ds_tensor", p).numel() for p in reference.module.parameters())
counts = [torch.zeros(1) for _ in range(distributed.world_size())]
torch.distributed.all_gather(counts, torch.tensor([float(held)]))
if distributed.is_main():
    json.dump({"held": [int(c.item()) for c in counts], "total": total,
               "tensors": len(list(reference.module.parameters()))}, open(out, "w"))
distributed.shutdown()
distributed.exit_now()
