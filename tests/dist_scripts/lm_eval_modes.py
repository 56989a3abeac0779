"""run_lm_eval under a 2-rank process group, in both modes, on the toy lm_eval task.

Argument (last, after the launcher's --local_rank): a work directory holding model/ (saved by the
test). Every rank writes rank<R>.json with what run_lm_eval returned to it; the test compares them
with a single-process run.
"""
import json
import os
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from wpn_dist.app import distributed
from wpn_dist.app.harness import run_lm_eval

work = sys.argv[-1]  # the launcher puts --local_rank first
distributed.init()
model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "model"))
tokenizer = AutoTokenizer.from_pretrained(os.path.join(work, "model"))
task = dict(tasks=["wpn_toy_qa"], include_path="tests/fixtures/lm_eval_toy", batch_size=8)
got = {"rank0": run_lm_eval(model, tokenizer, mode="rank0", **task),
       "sharded": run_lm_eval(model, tokenizer, mode="sharded", **task),
       "sharded_limit": run_lm_eval(model, tokenizer, mode="sharded", limit=15, **task)}
for mode in ("rank0", "sharded"):  # a task whose data file is missing: every rank raises, none hangs
    try:
        run_lm_eval(model, tokenizer, ["wpn_broken"], include_path=os.path.join(work, "broken"), mode=mode)
    except RuntimeError as e:
        got[f"broken_{mode}"] = str(e)
with open(os.path.join(work, f"rank{distributed.rank()}.json"), "w") as f:
    json.dump(got, f)
distributed.shutdown()
distributed.exit_now()
