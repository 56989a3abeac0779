"""The method plugins (GA, ICU, lm and WPN's options) on a tiny model in one process (no DeepSpeed),
the registry, and the data cursor's step plans."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import wpn_options
from wpn_dist.app import models
from wpn_dist.app.data import BatchMaker, DataCursor, encode_examples, read_jsonl
from wpn_dist.core import packed_attention
from wpn_dist.core.methods import build_method, method_class, method_names
from wpn_dist.core.methods.icu import sentence_bleu

DATA = os.path.join(os.path.dirname(__file__), "data", "tiny.jsonl")
NORMAL = [{"prompt": "what color is the sky", "response": "the sky is blue."},
          {"prompt": "name a fruit", "response": "an apple."},
          {"prompt": "count to three", "response": "one two three."}]
FORMAT = "Q: {prompt} A:"


@pytest.fixture(scope="module")
def setup():
    tokenizer = models.load_tokenizer("tiny-opt")
    model = models.load_model("tiny-opt", tokenizer, init="random", seed=0)
    model.config.use_cache = False
    assert packed_attention.install(model)  # batches are packed by default
    examples = read_jsonl(DATA)
    encoded, _, _ = encode_examples(examples, tokenizer, FORMAT, 96)
    return tokenizer, model, examples, encoded


def make_batch(setup, method, step=1):
    tokenizer, model, examples, encoded = setup
    maker = BatchMaker(encoded, examples, tokenizer, FORMAT, 96, method.row_groups(), NORMAL, seed=0,
                       **method.batch_options())
    if getattr(method.options, "anchor", None) == "generation":
        maker.set_anchors({e.example_id: "i will not." for e in encoded})
    return maker.make([0, 1, 2], step, 0, 0)


def tokens(batch, row):
    return batch["layout"].sequences[int(row)].token_ids


def padded(batch, rows, pad_id=1, response_only=True):
    """An independent reference: ``rows`` as a plain right-padded batch, labels on their responses
    (or on every token), whatever layout the batch has."""
    sequences = [batch["layout"].sequences[int(r)] for r in rows]
    width = max(len(s.token_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, s in enumerate(sequences):
        n = len(s.token_ids)
        ids[i, :n], mask[i, :n] = torch.tensor(s.token_ids), 1
        start = s.prompt_length if response_only else 0
        labels[i, start:n] = ids[i, start:n]
    return ids, mask, labels


def response_ce(model, batch, rows):
    ids, mask, labels = padded(batch, rows)
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def test_ga_terms_follow_the_recipe(setup):
    model = setup[1]
    method = build_method("ga")
    batch = make_batch(setup, method)
    assert method.needs_reference() and set(method.row_groups()) == {"random", "normal"}
    assert len(batch["random_rows"]) == len(batch["normal_rows"]) == 3
    terms = method.loss_terms(model, batch, reference=model)
    harmful = batch["negative_rows"][batch["negative_mask"]]
    torch.testing.assert_close(terms["loss/ga"], -response_ce(model, batch, harmful))
    torch.testing.assert_close(terms["loss/random"], response_ce(model, batch, batch["random_rows"]))
    assert terms["loss/kl"].abs() < 1e-6  # the reference is the model itself
    torch.testing.assert_close(terms["loss/total"], 0.5 * terms["loss/ga"] + terms["loss/random"] + terms["loss/kl"])
    # A changed model drifts from the reference: KL > 0.
    drifted = copy.deepcopy(model)
    with torch.no_grad():
        for p in drifted.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert method.loss_terms(drifted, batch, reference=model)["loss/kl"] > 1e-4


def test_ga_random_answers_pair_the_harmful_prompt_with_normal_responses(setup):
    tokenizer = setup[0]
    batch = make_batch(setup, build_method("ga"))
    for row, example_row in zip(batch["random_rows"], range(3)):
        text = tokenizer.decode(tokens(batch, row), skip_special_tokens=True)
        prompt = tokenizer.decode(tokens(batch, example_row)[:batch["layout"].sequences[example_row].prompt_length],
                                  skip_special_tokens=True)
        assert text.startswith(prompt) and any(n["response"] in text for n in NORMAL)


def test_batches_are_drawn_the_same_on_resume_and_differ_between_steps(setup):
    method = build_method("ga")
    a, b, c = make_batch(setup, method, 5), make_batch(setup, method, 5), make_batch(setup, method, 6)
    assert torch.equal(a["layout"].input_ids, b["layout"].input_ids)
    assert not all(torch.equal(make_batch(setup, method, s)["layout"].input_ids, c["layout"].input_ids)
                   for s in (1, 2, 3))


def test_icu_terms(setup):
    model = setup[1]
    method = build_method("icu")
    batch = make_batch(setup, method)
    terms = method.loss_terms(model, batch, reference=model)
    harmful = batch["negative_rows"][batch["negative_mask"]]
    torch.testing.assert_close(terms["loss/forget"], -response_ce(model, batch, harmful))
    torch.testing.assert_close(terms["loss/analogous"], response_ce(model, batch, torch.arange(3)))
    torch.testing.assert_close(terms["loss/total"], terms["loss/forget"] + 0.5 * terms["loss/analogous"] + terms["loss/kl"])


def test_lm_step_is_the_plain_causal_lm_loss_over_every_token(setup):
    model = setup[1]
    method = build_method("lm")
    batch = make_batch(setup, method)
    ids, mask, labels = padded(batch, range(len(batch["layout"].sequences)), response_only=False)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(method.loss_terms(model, batch)["loss/total"], expected)


def test_wpn_retain_and_generation_anchor(setup):
    model = setup[1]
    method = build_method("wpn", wpn_options(recovery_cuts=0, retain_weight=2.0, positive_lm_weight=0.0))
    batch = make_batch(setup, method)
    terms = method.loss_terms(model, batch)
    torch.testing.assert_close(terms["loss/retain"], response_ce(model, batch, batch["normal_rows"]))
    torch.testing.assert_close(terms["loss/total"], terms["loss/npair"] + 2.0 * terms["loss/retain"])
    # The generation anchor reads extra rows; it changes the N-pair value.
    plain = build_method("wpn", wpn_options(recovery_cuts=0, positive_lm_weight=0.0))
    prompt_anchor = plain.loss_terms(model, make_batch(setup, plain))["loss/npair"]
    method = build_method("wpn", wpn_options(recovery_cuts=0, anchor="generation", positive_lm_weight=0.0))
    batch = make_batch(setup, method)
    assert len(batch["anchor_rows"]) == 3
    assert not torch.allclose(method.loss_terms(model, batch)["loss/npair"], prompt_anchor)


def test_methods_that_need_normal_data_say_so(setup):
    from wpn_dist.app.data import DataError
    tokenizer, _, examples, encoded = setup
    with pytest.raises(DataError, match="normal data"):
        BatchMaker(encoded, examples, tokenizer, FORMAT, 96, ("random", "normal"), None, seed=0)


def test_sentence_bleu():
    ref = "sure ! step one : take a and b . step two : mix them"
    assert sentence_bleu(ref, [ref]) == pytest.approx(1.0)
    assert sentence_bleu("i can not help with that . please stay safe .", [ref]) == 0.0  # no 4-gram shared
    partial = sentence_bleu("sure ! step one : take c and d .", [ref])
    assert 0.01 < partial < 1.0
    assert sentence_bleu("", [ref]) == 0.0


def test_data_cursor_walks_a_subset_and_keeps_it_in_its_state():
    cursor = DataCursor([3, 5, 7, 9], micro_batch_size=2, world_size=1, accumulation=1, seed=0)
    seen = [i for _ in range(2) for i in cursor.next_step()[0][0]]
    assert sorted(seen) == [3, 5, 7, 9] and cursor.epoch_done()
    cursor.start_epoch([5, 9])
    assert sorted(cursor.next_step()[0][0]) == [5, 9] and cursor.state() == {"epoch": 1, "index": 1, "subset": [5, 9]}
    resumed = DataCursor([5, 9], 2, 1, 1, seed=0, epoch=1, index=1)
    assert resumed.epoch_done()


def test_epochs_end_on_step_boundaries_with_accumulation():
    """10 examples, micro-batch 2, accumulation 2: every epoch is 3 whole steps (12 slots, 2 of them
    padding copies), so an epoch never ends inside a step and ICU's refinement runs at every epoch end.
    (Before, the cursor rolled into a new epoch in the middle of a step and the refinement ran at 2 of
    5 epoch ends.)"""
    cursor = DataCursor(range(10), micro_batch_size=2, world_size=1, accumulation=2, seed=0)
    epoch_ends = 0
    for _ in range(15):
        if cursor.epoch_done():
            cursor.start_epoch()
            epoch_ends += 1
        plan = cursor.next_step()
        assert len(plan) == 2 and all(len(micro[0]) == 2 for micro in plan)
    assert cursor.epoch_done() and cursor.epoch == 4 and epoch_ends == 4  # 15 steps = 5 epochs of 3


def test_every_rank_plans_the_same_global_step():
    plans = [DataCursor(range(7), 2, world_size=3, accumulation=1, seed=1).next_step() for _ in range(2)]
    assert plans[0] == plans[1] and len(plans[0][0]) == 3
    # The three ranks' slices cover the shuffled examples, padded by repetition to 3 x 2 x 2 = 12 slots.
    cursor = DataCursor(range(7), 2, world_size=3, accumulation=1, seed=1)
    slots = [i for _ in range(2) for micro in cursor.next_step() for rank in micro for i in rank]
    assert len(slots) == 12 and set(slots) == set(range(7))


def test_padding_copies_count_once_in_every_term(setup):
    """A step whose plan holds an example twice (the sampler's padding) must give the same loss as the
    step with that example once: every term counts each example once."""
    tokenizer, model, examples, encoded = setup
    for name in method_names():
        method = build_method(name)
        if name == "wpn":
            method = build_method("wpn", wpn_options(recovery_cuts=0, positive_lm_weight=1.0, retain_weight=0.0))
        maker = BatchMaker(encoded, examples, tokenizer, FORMAT, 96, method.row_groups(), NORMAL, seed=0,
                       **method.batch_options())
        once = maker.step_batches([[[0, 1, 2]]], step=1, rank=0)[0]
        twice = maker.step_batches([[[0, 1, 2, 1]]], step=1, rank=0)[0]
        assert twice["row_weights"].tolist().count(0.0) >= 1
        reference = model if method.needs_reference() else None
        a, b = method.loss_terms(model, once, reference), method.loss_terms(model, twice, reference)
        for term in a:
            torch.testing.assert_close(a[term], b[term], msg=f"{name} {term}")


def test_registry_lists_every_method_with_its_own_options():
    assert method_names()[0] == "wpn" and {"wpn", "ga", "icu", "lm"} <= set(method_names())
    assert method_class("ga").Options().ga_weight == 0.5
    with pytest.raises(ValueError, match="unknown method"):
        method_class("nope")


def test_padding_copies_are_not_counted_as_tokens(setup):
    tokenizer, _, examples, encoded = setup
    maker = BatchMaker(encoded, examples, tokenizer, FORMAT, 96, (), None, seed=0)
    once = maker.step_batches([[[0, 1, 2]]], step=1, rank=0)[0]
    twice = maker.step_batches([[[0, 1, 2, 1]]], step=1, rank=0)[0]
    # packed: every distinct token once; the copy's tokens are computed but not counted
    assert once["num_tokens"] == once["layout"].num_executed_tokens() < sum(once["layout"].lengths.tolist())
    assert twice["num_tokens"] == once["num_tokens"] < twice["layout"].num_executed_tokens()


def test_sft_is_the_positive_lm_and_retain_terms_without_npair(setup):
    model = setup[1]
    method = build_method("sft")
    batch = make_batch(setup, method)
    terms = method.loss_terms(model, batch)
    assert "loss/npair" not in terms and set(method.row_groups()) == {"normal"}
    torch.testing.assert_close(terms["loss/positive_lm"], response_ce(model, batch, torch.arange(3)))
    torch.testing.assert_close(terms["loss/retain"], response_ce(model, batch, batch["normal_rows"]))
    torch.testing.assert_close(terms["loss/total"], terms["loss/positive_lm"] + terms["loss/retain"])


def test_wpn_recovery_rows_cut_the_harmful_answer_and_continue_harmlessly(setup):
    tokenizer, model, examples, encoded = setup
    options = wpn_options(recovery_cuts=2, positive_lm_weight=0.0, recovery_weight=1.0)
    method = build_method("wpn", options)
    batch = make_batch(setup, method)
    assert len(batch["recovery_rows"]) == 3 * 2 and batch["recovery_example"].tolist() == [0, 0, 1, 1, 2, 2]
    cuts = batch["layout"].prompt_lengths[batch["recovery_rows"]].tolist()  # a recovery row's prompt ends at its cut
    for row, cut, example in zip(batch["recovery_rows"], cuts, batch["recovery_example"]):
        harmful = encoded[int(example)].negatives[0].input_ids
        assert tokens(batch, row)[:cut] == harmful[:cut]  # the harmful start...
        text = tokenizer.decode(tokens(batch, row)[cut:], skip_special_tokens=True)
        assert text.strip() == examples[int(example)].harmless  # ...continued with the harmless answer
    assert cuts[0] < cuts[1]  # two distinct cut points
    terms = method.loss_terms(model, batch)
    assert terms["loss/recovery_npair"] > 0
    # The recovery LM term (default weight 1) is the cross-entropy of the harmless answer after each cut.
    torch.testing.assert_close(terms["loss/recovery_lm"], response_ce(model, batch, batch["recovery_rows"]))
    torch.testing.assert_close(terms["loss/total"], terms["loss/npair"] + terms["loss/recovery_npair"] +
                               terms["loss/recovery_lm"])


def test_random_recovery_depths_are_seeded_per_step_and_cover_every_depth(setup):
    tokenizer, model, examples, encoded = setup
    method = build_method("wpn", wpn_options(recovery_cuts=2, recovery_depths="random", prompt_noise=0))
    harmful = encoded[0].negatives[0]
    n = len(harmful.input_ids) - harmful.prompt_length - 1  # the response's tokens before its end token
    seen = set()
    for step in range(1, 100):
        batch = make_batch(setup, method, step)
        cuts = (batch["layout"].prompt_lengths[batch["recovery_rows"]] - harmful.prompt_length)[:2].tolist()
        assert cuts == (make_batch(setup, method, step)["layout"].prompt_lengths[batch["recovery_rows"]]
                        - harmful.prompt_length)[:2].tolist()  # a resumed run draws the same cuts
        assert len(set(cuts)) == 2 and all(1 <= k < n for k in cuts)
        for row, k in zip(batch["recovery_rows"][:2], cuts):
            assert tokens(batch, row)[:harmful.prompt_length + k] == harmful.input_ids[:harmful.prompt_length + k]
        seen.update(cuts)
    assert seen == set(range(1, n))  # every depth of the harmful start is trained at some step
    even = build_method("wpn", wpn_options(recovery_cuts=2, recovery_depths="even", prompt_noise=0))
    assert make_batch(setup, even, 1)["layout"].prompt_lengths[-6:].tolist() == \
        make_batch(setup, even, 2)["layout"].prompt_lengths[-6:].tolist()  # even cuts do not move


def pooled_weighted(hidden, start, stop):
    """Position-weighted mean over hidden[start:stop] (weights 1..n), written out by hand."""
    n = stop - start
    w = torch.arange(1, n + 1, dtype=torch.float32) / (n * (n + 1) / 2)
    return (hidden[start:stop].float() * w[:, None]).sum(0)


@pytest.mark.parametrize("side", ["candidates", "anchor"])
def test_wpn_frozen_side_pools_that_side_from_the_reference(setup, side):
    from wpn_dist.core.contrastive import npair_loss
    model = setup[1]
    reference = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs from the model, so the two sides can be told apart
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    options = method_class("wpn").Options(frozen_side=side, positive_lm_weight=0.0, retain_weight=0.0,
                                          recovery_cuts=0, global_negatives=False)
    method = build_method("wpn", options)
    assert method.needs_reference()
    batch = make_batch(setup, method)
    terms = method.loss_terms(model, batch, reference=reference)

    def states(m, row):  # a sequence alone, unpacked: an independent reading of its hidden states
        s = batch["layout"].sequences[int(row)]
        return m(input_ids=torch.tensor([s.token_ids]), output_hidden_states=True).hidden_states[-1][0], s
    anchor_model, candidate_model = (model, reference) if side == "candidates" else (reference, model)
    anchors, positives, negatives = [], [], []
    for i in range(3):
        h, s = states(anchor_model, i)
        anchors.append(pooled_weighted(h, 0, s.prompt_length))
        h, s = states(candidate_model, i)
        positives.append(pooled_weighted(h, s.prompt_length, len(s.token_ids)))
        row_negatives = []
        for row in batch["negative_rows"][i]:
            h, s = states(candidate_model, row)
            row_negatives.append(pooled_weighted(h, s.prompt_length, len(s.token_ids)))
        negatives.append(torch.stack(row_negatives))
    expected = npair_loss(torch.stack(anchors), torch.stack(positives), torch.stack(negatives), batch["negative_mask"],
                          temperature=options.temperature, global_negatives=False)
    torch.testing.assert_close(terms["loss/npair"], expected, rtol=1e-4, atol=1e-5)
    terms["loss/total"].backward()
    assert all(p.grad is None for p in reference.parameters())  # the frozen side is a constant
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_wpn_retention_is_the_relative_distance_to_the_frozen_states_on_normal_rows(setup):
    model = setup[1]
    options = wpn_options(retention_weight=2.0, positive_lm_weight=0.0, retain_weight=0.0, recovery_cuts=0)
    method = build_method("wpn", options)
    assert method.needs_reference() and "normal" in method.row_groups()
    batch = make_batch(setup, method)
    assert method.loss_terms(model, batch, reference=model)["loss/retention"].abs() < 1e-10
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    terms = method.loss_terms(model, batch, reference=reference)
    per_row = []
    for row in batch["normal_rows"]:  # each normal row alone, unpacked
        ids = torch.tensor([batch["layout"].sequences[int(row)].token_ids])
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        h0 = reference(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        per_row.append(((h - h0) ** 2).sum(-1) / (h0 ** 2).sum(-1))
    torch.testing.assert_close(terms["loss/retention"], torch.cat(per_row).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["loss/total"], terms["loss/npair"] + 2.0 * terms["loss/retention"])


def test_wpn_forget_term_is_capped_gradient_ascent_on_the_harmful_tokens(setup):
    model = setup[1]
    options = dict(recovery_cuts=0, positive_lm_weight=0.0, forget_weight=0.5)
    batch = make_batch(setup, build_method("wpn", wpn_options(**options)))
    harmful = batch["negative_rows"][batch["negative_mask"]]
    ids, mask, labels = padded(batch, harmful)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    targets = labels[:, 1:].reshape(-1)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets, reduction="none")[targets != -100]
    # A cap above every token's NLL is plain gradient ascent; at the median, half the tokens sit at the cap.
    for cap in (float(nll.max()) + 1, float(nll.median())):
        method = build_method("wpn", wpn_options(**options, forget_cap=cap))
        terms = method.loss_terms(model, batch)
        torch.testing.assert_close(terms["loss/forget"], -nll.clamp_max(cap).mean())
        torch.testing.assert_close(terms["loss/total"], terms["loss/npair"] + 0.5 * terms["loss/forget"])
    model.zero_grad(set_to_none=True)
    terms["loss/forget"].backward()  # the tokens under the cap still give a gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="forget_cap"):
        method_class("wpn").Options(forget_cap=0)
