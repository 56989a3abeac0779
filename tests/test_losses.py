import math

import pytest
import torch
import torch.nn.functional as F

from wpn_dist.core.contrastive import npair_loss


def naive_npair(anchor, positive, negative_lists, temperature, similarity):
    """Per-example loop straight from the formula."""
    def sim(a, b):
        return float(F.cosine_similarity(a, b, dim=0)) if similarity == "cosine" else float(a @ b)
    losses = []
    for a, p, negs in zip(anchor, positive, negative_lists):
        pos = math.exp(sim(a, p) / temperature)
        neg = sum(math.exp(sim(a, n) / temperature) for n in negs)
        losses.append(-math.log(pos / (pos + neg)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_local_negatives_match_naive_loop(similarity):
    torch.manual_seed(0)
    anchor, positive = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    negatives = torch.randn(4, 3, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    lists = [[negatives[i, k] for k in range(3) if mask[i, k]] for i in range(4)]
    got = npair_loss(anchor, positive, negatives, mask, temperature=0.5, similarity=similarity)
    assert got.item() == pytest.approx(naive_npair(anchor, positive, lists, 0.5, similarity), rel=1e-6)


def test_global_negatives_use_every_examples_harmful_responses():
    torch.manual_seed(1)
    anchor, positive = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    negatives = torch.randn(3, 2, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    every = [negatives[j, k] for j in range(3) for k in range(2) if mask[j, k]]
    got = npair_loss(anchor, positive, negatives, mask, temperature=0.2, global_negatives=True)
    assert got.item() == pytest.approx(naive_npair(anchor, positive, [every] * 3, 0.2, "cosine"), rel=1e-6)


def test_duplicate_example_ids_count_once():
    torch.manual_seed(2)
    anchor, positive = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    negatives = torch.randn(2, 2, 4, dtype=torch.float64)
    once = npair_loss(anchor, positive, negatives, global_negatives=True)
    # Repeat example 0 as a padding copy: same id, so neither its anchor nor its negatives count twice.
    twice = npair_loss(torch.cat([anchor, anchor[:1]]), torch.cat([positive, positive[:1]]),
                       torch.cat([negatives, negatives[:1]]), global_negatives=True,
                       example_ids=torch.tensor([0, 1, 0]))
    assert twice.item() == pytest.approx(once.item(), rel=1e-9)


def test_gradients_flow_to_every_input():
    anchor = torch.randn(2, 4, requires_grad=True)
    positive = torch.randn(2, 4, requires_grad=True)
    negatives = torch.randn(2, 3, 4, requires_grad=True)
    npair_loss(anchor, positive, negatives, global_negatives=True).backward()
    for t in (anchor, positive, negatives):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_bad_shapes_and_temperature_raise():
    with pytest.raises(ValueError, match="negatives must be"):
        npair_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match="temperature"):
        npair_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 1, 4), temperature=0)


def test_planned_npair_loss_issues_one_gather_on_two_ranks():
    """With the step plan's dedup mask and shapes the N-pair loss needs one collective each way, and
    equals the general path (tests/dist_scripts/one_gather.py asserts both)."""
    from conftest import run_ranks
    run_ranks(["tests/dist_scripts/one_gather.py"], num_procs=2)
