"""Every method's loss and parameter gradients are invariant to how a step's examples are split, and
to the batch layout (packed: every prompt encoded once, no padding; padded: one row per sequence):
1 rank x 4 examples, 2 ranks x 2, and 1 rank x 2 with 2 accumulated micro-batches agree within 1e-5
(fp32, ZeRO-3, activation checkpointing, tiny OPT; the layouts also on tiny GPT-Neo, whose local-attention
layers see a window shorter than the sequences here).

WPN's global negatives are the exception by construction under accumulation: the negatives a
micro-batch sees are those gathered from every rank at the same micro-step, so with accumulation
fewer examples are negatives of each other. Its world-size invariance is checked; its accumulation
invariance is checked with local negatives (the example's own harmful responses)."""
import pytest
import torch

from conftest import run_ranks
from test_parity import assert_same
from wpn_dist.core.methods import method_names

# Every registered method (a new one is checked without touching this file), and WPN's variants.
ALL = list(method_names()) + ["wpn-trained-sides", "wpn-local-negatives", "wpn-recovery", "wpn-retention"]
GLOBAL_NEGATIVES = ("wpn", "wpn-trained-sides")  # gathered per micro-step: not invariant to accumulation (below)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = {}
    for layout, ranks in (("1x4", 1), ("2x2", 2), ("1x2acc2", 1)):
        path = tmp_path_factory.mktemp("inv") / f"{layout}.pt"
        run_ranks(["tests/dist_scripts/invariance.py", layout, str(path)], num_procs=ranks)
        out[layout] = torch.load(path)
    return out


# (plan, model, batch layout) -> ranks: the packed runs against padded ones, on 1 and 2 ranks.
LAYOUT_RUNS = {("1x4", "tiny-opt", "padded"): 1, ("2x2", "tiny-opt", "padded"): 2,
               ("1x4", "tiny-gpt-neo", "packed"): 1, ("1x4", "tiny-gpt-neo", "padded"): 1,
               ("2x2", "tiny-gpt-neo", "packed"): 2}


@pytest.fixture(scope="module")
def batch_layouts(tmp_path_factory, layouts):
    out = {("1x4", "tiny-opt", "packed"): layouts["1x4"], ("2x2", "tiny-opt", "packed"): layouts["2x2"]}
    for key, ranks in LAYOUT_RUNS.items():
        path = tmp_path_factory.mktemp("layout") / ("-".join(key) + ".pt")
        run_ranks(["tests/dist_scripts/invariance.py", key[0], str(path), key[1], key[2]], num_procs=ranks)
        out[key] = torch.load(path)
    return out


@pytest.mark.parametrize("model", ["tiny-opt", "tiny-gpt-neo"])
@pytest.mark.parametrize("method", ALL)
def test_packed_layout_equals_padded(method, model, batch_layouts):
    padded = batch_layouts[("1x4", model, "padded")]
    assert_same({method: batch_layouts[("1x4", model, "packed")][method]}, {method: padded[method]})
    assert_same({method: batch_layouts[("2x2", model, "packed")][method]}, {method: padded[method]})


def test_padded_layout_two_ranks_equal_one(batch_layouts):
    assert_same(batch_layouts[("2x2", "tiny-opt", "padded")], batch_layouts[("1x4", "tiny-opt", "padded")])


@pytest.mark.parametrize("method", ALL)
def test_two_ranks_equal_one(method, layouts):
    assert_same({method: layouts["2x2"][method]}, {method: layouts["1x4"][method]})


@pytest.mark.parametrize("method", [m for m in ALL if m not in GLOBAL_NEGATIVES])
def test_accumulation_equals_one_batch(method, layouts):
    assert_same({method: layouts["1x2acc2"][method]}, {method: layouts["1x4"][method]})


def test_global_negatives_see_fewer_negatives_under_accumulation(layouts):
    """Documents the exception above: the value differs, so the test above would be wrong for it."""
    for method in GLOBAL_NEGATIVES:
        assert layouts["1x2acc2"][method]["loss"] != pytest.approx(layouts["1x4"][method]["loss"], rel=1e-5)
