"""The baselines beside WPN (NPO, SimNPO, RMU, representation rerouting): each term against an
independent reading of the model (each sequence alone, unpacked), and every unlearning method, trained
a few steps on the toy world in one process, lowers the likelihood of the harmful responses."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from test_methods import make_batch, padded, response_ce, setup  # noqa: F401 (the fixture)
from wpn_dist.core.methods import build_method, method_class, method_names


def sequence_nll(model, batch, rows):
    """Each row's summed response NLL, from a plain right-padded forward."""
    ids, mask, labels = padded(batch, rows)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    return nll.sum(1), (labels[:, 1:] != -100).sum(1)


def perturbed(model, scale=0.05):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def states(model, batch, row, layer):
    s = batch["layout"].sequences[int(row)]
    return model(input_ids=torch.tensor([s.token_ids]), output_hidden_states=True).hidden_states[layer][0], s


def test_npo_term_is_the_log_sigmoid_of_the_likelihood_ratio(setup):
    model = setup[1]
    method = build_method("npo")
    batch = make_batch(setup, method)
    harmful = batch["negative_rows"][batch["negative_mask"]]
    # Against itself the ratio is 1: the term is (2 / beta) log 2.
    terms = method.loss_terms(model, batch, reference=model)
    torch.testing.assert_close(terms["loss/npo"], torch.tensor(2 / 0.1 * math.log(2)))
    reference = perturbed(model)
    terms = method.loss_terms(model, batch, reference=reference)
    nll, _ = sequence_nll(model, batch, harmful)
    nll_ref, _ = sequence_nll(reference, batch, harmful)
    expected = (-(2 / 0.1) * F.logsigmoid(-0.1 * (nll_ref - nll))).mean()
    torch.testing.assert_close(terms["loss/npo"], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(terms["loss/retain"], response_ce(model, batch, batch["normal_rows"]))
    torch.testing.assert_close(terms["loss/total"], terms["loss/npo"] + terms["loss/retain"])


def test_simnpo_term_is_reference_free_and_length_normalised(setup):
    model = setup[1]
    method = build_method("simnpo")
    assert not method.needs_reference()
    batch = make_batch(setup, method)
    harmful = batch["negative_rows"][batch["negative_mask"]]
    terms = method.loss_terms(model, batch)
    nll, count = sequence_nll(model, batch, harmful)
    expected = (-(2 / 4.5) * F.logsigmoid(4.5 * nll / count)).mean()
    torch.testing.assert_close(terms["loss/simnpo"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["loss/total"], 0.125 * terms["loss/simnpo"] + terms["loss/retain"])


def test_rmu_steers_the_forget_states_and_holds_the_retain_states(setup):
    model = setup[1]
    options = method_class("rmu").Options(rmu_layer=1, rmu_steering_coeff=3.0)
    method = build_method("rmu", options)
    batch = make_batch(setup, method)
    assert method.loss_terms(model, batch, reference=model)["loss/retain"].abs() < 1e-10
    reference = perturbed(model)
    terms = method.loss_terms(model, batch, reference=reference)
    generator = torch.Generator().manual_seed(0)
    u = torch.rand(model.config.hidden_size, generator=generator)
    target = 3.0 * u / u.norm()
    forget, retain = [], []
    for row in batch["negative_rows"][batch["negative_mask"]]:
        h, s = states(model, batch, row, 1)
        forget.append(((h[s.prompt_length:] - target) ** 2).mean(-1))
    for row in batch["normal_rows"]:
        h, _ = states(model, batch, row, 1)
        h0, _ = states(reference, batch, row, 1)
        retain.append(((h - h0) ** 2).mean(-1))
    torch.testing.assert_close(terms["loss/forget"], torch.cat(forget).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["loss/retain"], torch.cat(retain).mean(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(terms["loss/total"], terms["loss/forget"] + 1200.0 * terms["loss/retain"])


class FakeRun:
    def __init__(self, step, total_steps):
        self.step, self.total_steps = step, total_steps


def test_rr_reroutes_harmful_states_on_its_schedule(setup):
    model = setup[1]
    method = build_method("rr", method_class("rr").Options(rr_layers="1,2"))
    batch = make_batch(setup, method)
    terms = method.loss_terms(model, batch, reference=model)  # the same states: cosine 1, distance 0
    torch.testing.assert_close(terms["loss/reroute"], torch.tensor(1.0))
    assert terms["loss/retain"].abs() < 1e-5
    reference = perturbed(model)
    method.on_step_start(FakeRun(50, 100))
    assert method.coefficients() == pytest.approx((10 * 0.75, 10 * 0.25))
    terms = method.loss_terms(model, batch, reference=reference)
    reroute, retain = [], []
    for layer in (1, 2):
        per_layer = []
        for row in batch["negative_rows"][batch["negative_mask"]]:
            h, s = states(model, batch, row, layer)
            h0, _ = states(reference, batch, row, layer)
            per_layer.append(F.relu(F.cosine_similarity(h[s.prompt_length:], h0[s.prompt_length:], dim=-1)))
        reroute.append(torch.cat(per_layer).mean())
        per_layer = []
        for row in batch["normal_rows"]:
            h, _ = states(model, batch, row, layer)
            h0, _ = states(reference, batch, row, layer)
            per_layer.append((h - h0).norm(dim=-1))
        retain.append(torch.cat(per_layer).mean())
    torch.testing.assert_close(terms["loss/reroute"], torch.stack(reroute).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["loss/retain"], torch.stack(retain).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["loss/total"], 7.5 * terms["loss/reroute"] + 2.5 * terms["loss/retain"])


UNLEARNING = [m for m in method_names() if m != "lm"]


@pytest.fixture(scope="module")
def toy(implanted_toy_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from wpn_dist.app import toy_world
    from wpn_dist.app.data import encode_examples, examples_from_rows
    world = toy_world.make_world(toy_world.ToyWorldConfig(seed=0))
    tokenizer = AutoTokenizer.from_pretrained(implanted_toy_model)
    examples = examples_from_rows(world.unlearning_rows(), "toy")
    encoded, _, _ = encode_examples(examples, tokenizer, toy_world.PROMPT_FORMAT, 64)
    load = lambda: AutoModelForCausalLM.from_pretrained(implanted_toy_model, dtype=torch.float32)  # noqa: E731
    return world, tokenizer, examples, encoded, load


def harmful_loglik(model, tokenizer, world):
    """Mean per-token log-likelihood of the held-out prompts' harmful responses (the extraction measure)."""
    from wpn_dist.app import toy_world
    from wpn_dist.app.evaluation import perplexity
    with torch.no_grad():
        return -math.log(perplexity(model, tokenizer, world.extraction_rows(), toy_world.PROMPT_FORMAT, 64, 64))


@pytest.mark.parametrize("name", UNLEARNING)
def test_every_method_lowers_the_harmful_likelihood_on_the_toy_world(name, toy):
    from wpn_dist.app.data import BatchMaker
    from wpn_dist.core import packed_attention
    world, tokenizer, examples, encoded, load = toy
    torch.manual_seed(0)
    model, reference = load(), None
    from wpn_dist.bench.toybench import TOY_OPTIONS
    options = method_class(name).Options(**TOY_OPTIONS.get(name, {}))  # the benchmark's settings
    if hasattr(options, "resolve_defaults"):
        options.resolve_defaults(toy_world=True)
    method = build_method(name, options)
    assert packed_attention.install(model)
    if method.needs_reference():
        reference = load().eval()
        packed_attention.install(reference)
    maker = BatchMaker(encoded, examples, tokenizer, "### Question: {prompt} ### Answer:", 64, method.row_groups(),
                       world.normal_rows(), seed=0, **method.batch_options())
    before = harmful_loglik(model.eval(), tokenizer, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    model.train()
    model.config.use_cache = False
    steps = 30
    for step in range(1, steps + 1):
        method.on_step_start(FakeRun(step, steps)) if name == "rr" else None
        indices = [(16 * step + i) % len(encoded) for i in range(16)]
        terms = method.loss_terms(model, maker.make(indices, step, 0, 0), reference)
        terms["loss/total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.config.use_cache = True
    after = harmful_loglik(model.eval(), tokenizer, world)
    assert before > -0.2 and after < before - 0.2, (name, before, after)  # per token: x0.8, a sequence x0.03


def test_extraction_likelihood_pieces():
    from wpn_dist.core.methods.icu import ngram_overlap, prefix_lengths
    assert prefix_lengths(17, 10, 4) == [0, 2, 5, 7] and prefix_lengths(8, 10, 4) == [0]
    truth = "a b c d e".split()
    assert ngram_overlap(truth, truth, 3) == 1.0
    assert ngram_overlap("x a b c y".split(), truth, 3) == pytest.approx(1 / 3)  # "a b c" of 3 trigrams
    assert ngram_overlap("e d c b a".split(), truth, 3) == 0.0
    assert ngram_overlap("a b".split(), "a b".split(), 10) == 1.0  # n capped at the truth's length


class StopRuleRun:
    """What ICU's hook sees of a run: fixed measures, recorded decisions."""
    epoch = 1

    def __init__(self, examples, accuracy, continuation):
        self._examples, self.accuracy, self.continuation = examples, accuracy, continuation
        self.subset, self.asked, self.lines = None, [], []

    def examples(self):
        return self._examples

    def generate(self, prompts, prefills=None):
        self.asked.append((prompts, prefills))
        if prefills is None:  # the BLEU refinement: every sample still gives its harmful answer
            return [e.harmful[0] for e in self._examples]
        return [self.continuation] * len(prompts)

    def memorization_accuracy(self, rows):
        return self.accuracy

    def set_epoch_subset(self, indices):
        self.subset = indices

    def log(self, message):
        self.lines.append(message)


def test_icu_second_stopping_rule_stops_only_when_both_measures_are_below(setup):
    examples = setup[2][:3]
    options = method_class("icu").Options(icu_ma_threshold=0.5, icu_el_threshold=0.2, icu_el_ngram=2)
    cases = [(0.4, "nothing like the answer", []),  # both below: training stops
             (0.6, "nothing like the answer", [0, 1, 2]),  # accuracy above: go on
             (0.4, None, [0, 1, 2])]  # the continuation is the harmful answer's rest: go on
    for accuracy, continuation, subset in cases:
        method = build_method("icu", options)
        run = StopRuleRun(examples, accuracy, continuation)
        if continuation is None:
            def rest(prompts, prefills=None, run=run):  # the true rest of the harmful answer it was started on
                if prefills is None:
                    return [e.harmful[0] for e in examples]
                out = []
                for prompt, prefill in zip(prompts, prefills):
                    h = next(h for e in examples if e.prompt == prompt for h in e.harmful if h.startswith(prefill))
                    out.append(" ".join(h.split()[len(prefill.split()):]))
                return out
            run.generate = rest
        method.on_epoch_start(run)
        assert run.subset == subset, (accuracy, continuation, run.lines)
        if continuation is not None:
            prompts, prefills = run.asked[-1]
            # every harmful response of every example, from the prompt alone (prefix 0) and longer prefixes
            assert len(prompts) == len(prefills) and "" in prefills and any(prefills)
    with pytest.raises(ValueError, match="go together"):
        method_class("icu").Options(icu_ma_threshold=0.5)
    # Without thresholds the rule is off: no measures are taken.
    method = build_method("icu")
    run = StopRuleRun(examples, 0.0, "x")
    method.on_epoch_start(run)
    assert run.subset == [0, 1, 2] and len(run.asked) == 1


def test_memorization_accuracy_counts_greedy_hits_on_response_tokens(toy):
    from wpn_dist.app import toy_world
    from wpn_dist.app.data import encode_normal
    from wpn_dist.app.evaluation import memorization_accuracy, perplexity
    world, tokenizer, _, _, load = toy
    model = load().eval()
    # memorised harmful answers, and refusals to the same prompts that the model never gave
    rows = world.extraction_rows()[:4] + [{"prompt": r["prompt"], "response": world.refusal("it")}
                                          for r in world.extraction_rows()[:4]]
    hits, total, nll = [0, 0], [0, 0], 0.0  # [harmful rows, refusal rows]
    with torch.no_grad():
        # each row alone, by hand
        for i, pair in enumerate(encode_normal(rows, tokenizer, toy_world.PROMPT_FORMAT, 64)):
            ids = torch.tensor([pair.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            targets = ids[0, 1:]
            response = torch.arange(targets.shape[0]) >= pair.prompt_length - 1
            hits[i >= 4] += int((logits.argmax(-1) == targets)[response].sum())
            total[i >= 4] += int(response.sum())
            nll += float(F.cross_entropy(logits[response], targets[response], reduction="sum"))
    # The harmful answers are known token by token; the refusals, never given to these prompts, less so
    # (their wording is the world's refusal template, so much of it is still guessed).
    assert hits[1] / total[1] < 0.9 < hits[0] / total[0]  # seen here: 0.71-0.83 and 0.98
    hits, total = sum(hits), sum(total)
    accuracy = memorization_accuracy(model, tokenizer, rows, toy_world.PROMPT_FORMAT, 64, 3)
    assert accuracy == pytest.approx(hits / total)
    assert perplexity(model, tokenizer, rows, toy_world.PROMPT_FORMAT, 64, 3) == pytest.approx(math.exp(nll / total),
                                                                                              rel=1e-5)
