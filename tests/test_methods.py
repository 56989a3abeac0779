"""The objectives of GA, ICU, lm and WPN's options, on a tiny model in one process (no DeepSpeed)."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from wpn_dist import models
from wpn_dist.config import MethodArguments
from wpn_dist.data import BatchMaker, encode_examples, read_jsonl
from wpn_dist.icu import sentence_bleu
from wpn_dist.methods import extra_row_groups, loss_terms, needs_reference
from wpn_dist.train import DataCursor
from wpn_dist.data import ShardedSampler

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
    examples = read_jsonl(DATA)
    encoded, _, _ = encode_examples(examples, tokenizer, FORMAT, 96)
    return tokenizer, model, examples, encoded


def make_batch(setup, method, step=1):
    tokenizer, model, examples, encoded = setup
    maker = BatchMaker(encoded, examples, tokenizer, FORMAT, 96, extra_row_groups(method), NORMAL, seed=0)
    if method.anchor == "generation":
        maker.set_anchors({e.example_id: "i will not." for e in encoded})
    return maker.make([0, 1, 2], step, 0, 0)


def response_ce(model, batch, rows):
    logits = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits
    labels = batch["labels"][rows]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def test_ga_terms_follow_the_recipe(setup):
    model = setup[1]
    method = MethodArguments(method="ga")
    batch = make_batch(setup, method)
    assert needs_reference(method) and set(extra_row_groups(method)) == {"random", "normal"}
    assert len(batch["random_rows"]) == len(batch["normal_rows"]) == 3
    terms = loss_terms(model, batch, method, reference=model)
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
    assert loss_terms(drifted, batch, method, reference=model)["loss/kl"] > 1e-4


def test_ga_random_answers_pair_the_harmful_prompt_with_normal_responses(setup):
    tokenizer = setup[0]
    batch = make_batch(setup, MethodArguments(method="ga"))
    for row, example_row in zip(batch["random_rows"], range(3)):
        text = tokenizer.decode(batch["input_ids"][row], skip_special_tokens=True)
        prompt = tokenizer.decode(batch["input_ids"][example_row][batch["prompt_mask"][example_row].bool()],
                                  skip_special_tokens=True)
        assert text.startswith(prompt) and any(n["response"] in text for n in NORMAL)


def test_batches_are_drawn_the_same_on_resume_and_differ_between_steps(setup):
    method = MethodArguments(method="ga")
    a, b, c = make_batch(setup, method, 5), make_batch(setup, method, 5), make_batch(setup, method, 6)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not all(torch.equal(make_batch(setup, method, s)["input_ids"], c["input_ids"]) for s in (1, 2, 3))


def test_icu_terms(setup):
    model = setup[1]
    method = MethodArguments(method="icu")
    batch = make_batch(setup, method)
    terms = loss_terms(model, batch, method, reference=model)
    harmful = batch["negative_rows"][batch["negative_mask"]]
    torch.testing.assert_close(terms["loss/forget"], -response_ce(model, batch, harmful))
    torch.testing.assert_close(terms["loss/analogous"], response_ce(model, batch, torch.arange(3)))
    torch.testing.assert_close(terms["loss/total"], terms["loss/forget"] + 0.5 * terms["loss/analogous"] + terms["loss/kl"])


def test_lm_step_is_the_plain_causal_lm_loss_over_every_token(setup):
    model = setup[1]
    method = MethodArguments(method="lm")
    batch = make_batch(setup, method)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    torch.testing.assert_close(loss_terms(model, batch, method)["loss/total"], expected)


def test_wpn_retain_and_generation_anchor(setup):
    model = setup[1]
    method = MethodArguments(retain_weight=2.0, positive_lm_weight=0.0)
    batch = make_batch(setup, method)
    terms = loss_terms(model, batch, method)
    torch.testing.assert_close(terms["loss/retain"], response_ce(model, batch, batch["normal_rows"]))
    torch.testing.assert_close(terms["loss/total"], terms["loss/npair"] + 2.0 * terms["loss/retain"])
    # The generation anchor reads extra rows; it changes the N-pair value.
    prompt_anchor = loss_terms(model, make_batch(setup, MethodArguments(positive_lm_weight=0.0)),
                               MethodArguments(positive_lm_weight=0.0))["loss/npair"]
    method = MethodArguments(anchor="generation", positive_lm_weight=0.0)
    batch = make_batch(setup, method)
    assert len(batch["anchor_rows"]) == 3
    assert not torch.allclose(loss_terms(model, batch, method)["loss/npair"], prompt_anchor)


def test_methods_that_need_normal_data_say_so(setup):
    from wpn_dist.data import DataError
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
    def make_sampler(n):
        return ShardedSampler(n, 2, 0, 1, seed=0)
    cursor = DataCursor(make_sampler, [3, 5, 7, 9])
    seen = [i for _ in range(2) for i in cursor.next()]
    assert sorted(seen) == [3, 5, 7, 9] and cursor.epoch_done()
    cursor.start_epoch([5, 9])
    assert sorted(cursor.next()) == [5, 9] and cursor.state() == {"epoch": 1, "index": 1, "subset": [5, 9]}
    resumed = DataCursor(make_sampler, [5, 9], epoch=1, index=1)
    assert resumed.epoch_done()
