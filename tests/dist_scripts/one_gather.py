"""The N-pair loss with the step plan's mask and shapes (gather_shape) against the general path that
finds them with collectives: the same loss and gradients, from exactly one collective in forward
and one in backward. Two ranks with different B and K; example 7 is on both (counted once).
Usage: one_gather.py (exits non-zero on a mismatch)."""
import torch
import torch.distributed as dist

from wpn_dist.app import distributed
from wpn_dist.core.contrastive import npair_loss

calls = []
for name in ("all_gather", "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
             "all_gather_object", "reduce_scatter"):
    def counting(*args, _name=name, _f=getattr(dist, name), **kwargs):
        calls.append(_name)
        return _f(*args, **kwargs)
    setattr(dist, name, counting)

distributed.init()
rank = distributed.rank()
ids = [[3, 7], [7, 9, 11]][rank]                 # example 7 on both ranks: its second copy does not count
num_neg = [2, 3][rank]
torch.manual_seed(rank)
D = 8
anchor = torch.randn(len(ids), D, requires_grad=True)
positive = torch.randn(len(ids), D, requires_grad=True)
negatives = torch.randn(len(ids), num_neg, D, requires_grad=True)
mask = torch.ones(len(ids), num_neg, dtype=torch.bool)
mask[0, -1] = False
example_ids = torch.tensor(ids)

general = npair_loss(anchor, positive, negatives, mask, temperature=0.5, global_negatives=True,
                     example_ids=example_ids)
general.backward()
grads = [t.grad.clone() for t in (anchor, positive, negatives)]
for t in (anchor, positive, negatives):
    t.grad = None

# What the step plan knows on the host: first copies in rank order, the global shapes and count.
first = torch.tensor([[True, True], [False, True, True]][rank])
weights, count = first.float(), 4.0
calls.clear()
planned = npair_loss(anchor, positive, negatives, mask & first[:, None], temperature=0.5, global_negatives=True,
                     example_ids=example_ids, anchor_weights=weights, normalizer=count / 2, gather_shape=(3, 3))
forward_calls = list(calls)
planned.backward()
backward_calls = calls[len(forward_calls):]
assert forward_calls == ["all_gather"], forward_calls
assert len(backward_calls) == 1, backward_calls
# The general path's value is the mean over ranks' losses scaled to the global mean: compare the sums.
total_general = distributed.all_reduce_sum(general.item())
total_planned = distributed.all_reduce_sum(planned.item())
assert abs(total_general - total_planned) < 1e-5, (total_general, total_planned)
for t, g in zip((anchor, positive, negatives), grads):
    torch.testing.assert_close(t.grad, g)
print(f"one_gather: rank {rank} ok: forward {forward_calls}, backward {backward_calls}", flush=True)
distributed.shutdown()
distributed.exit_now()
