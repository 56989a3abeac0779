"""Prompt noise (WPN's and sft's --prompt_noise): which tokens it may touch, what it puts in their
place, how often, that every row of an example shares the disturbed prompt, and that the draws are
seeded per (seed, step, example)."""
import pytest

from conftest import wpn_options
from wpn_dist.app import models, toy_world as toy
from wpn_dist.app.data import BatchMaker, Example, encode_examples, encode_normal
from wpn_dist.app.evaluation import toy_normal_rows
from wpn_dist.app.prompt_noise import PromptNoise
from wpn_dist.core.methods import build_method, method_class

FORMAT = toy.PROMPT_FORMAT  # "### Question: {prompt} ### Answer:"


@pytest.fixture(scope="module")
def toy_setup():
    world = toy.make_world(toy.ToyWorldConfig(seed=0))
    tokenizer = toy.make_tokenizer(world)
    examples = [Example(i, r["prompt"], r["harmless"], r["harmful"]) for i, r in enumerate(world.unlearning_rows())]
    encoded, _, _ = encode_examples(examples, tokenizer, FORMAT, 64)
    normal = toy_normal_rows(world)
    return world, tokenizer, examples, encoded, normal


def maker_for(toy_setup, **options):
    world, tokenizer, examples, encoded, normal = toy_setup
    options.setdefault("prompt_noise", 0.4)  # the default with normal data
    method = build_method("wpn", wpn_options(recovery_cuts=2, retain_weight=1.0, **options))
    return BatchMaker(encoded, examples, tokenizer, FORMAT, 64, method.row_groups(), normal, seed=0,
                      **method.batch_options())


def words_of(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def words_of_rows(examples, normal, responses: bool) -> set:
    """The reference pool, from the world's text: every word of the training prompts and of the normal
    data's prompts, and with ``responses`` every word of their responses (harmless, harmful, normal)."""
    words = {w for e in examples for w in e.prompt.split()} | {w for r in normal for w in r["prompt"].split()}
    if responses:
        words |= {w for e in examples for r in [e.harmless] + list(e.harmful) for w in r.split()}
        words |= {w for r in normal for w in r["response"].split()}
    return words


@pytest.mark.parametrize("pool", ["data", "prompts"])
def test_only_the_prompt_text_changes_and_only_to_words_of_the_pool(toy_setup, pool):
    world, tokenizer, examples, encoded, normal = toy_setup
    maker = maker_for(toy_setup, prompt_noise_pool=pool)
    allowed = words_of_rows(examples, normal, responses=pool == "data")
    # The words of the unseen phrasings (OOD) and of the attacks are in neither pool.
    assert not {"friend", "method", "story", "villain", "ignore"} & allowed
    disturbed, seen = 0, set()
    for step in range(1, 41):
        for e in encoded[:10]:
            out = maker.disturbed(e, step)
            if out is e:
                continue
            disturbed += 1
            words = words_of(tokenizer, out.positive.input_ids[:out.positive.prompt_length])
            assert words[:2] == ["###", "Question:"] and words[-2:] == ["###", "Answer:"]
            assert set(words[2:-2]) <= allowed
            assert words[2:-2] != examples[e.example_id].prompt.split()
            seen |= set(words[2:-2])
            # the responses are the example's own, after the disturbed prompt
            for new, old in zip([out.positive] + out.negatives, [e.positive] + e.negatives):
                assert new.input_ids[new.prompt_length:] == old.input_ids[old.prompt_length:]
                assert new.input_ids[:new.prompt_length] == out.positive.input_ids[:out.positive.prompt_length]
    assert 0.35 <= disturbed / 400 <= 0.65  # half the examples per step
    # The pool is exactly the reference's words: no special token, nothing left out.
    assert sorted(tokenizer.convert_ids_to_tokens(maker.noise.pool)) == sorted(allowed)
    answer_words = set(world.harm_words) | {"sure"} | {r["answer"] for r in normal}
    assert (answer_words <= allowed) == (pool == "data")
    if pool == "data":
        assert seen & answer_words  # drawn, not only listed


def test_replacement_and_insertion_rates(toy_setup):
    """Each token of the prompt's text is replaced with probability p, else followed by an insertion
    with probability p/2: a disturbed prompt is 1 + p/2 times as long on average, and a share of about
    1 - p of its original tokens stays in place (measured by an alignment-free count: the prompt
    grows by exactly the number of insertions)."""
    world, tokenizer, examples, encoded, normal = toy_setup
    noise = PromptNoise(0.4, tokenizer, FORMAT, [e.positive.input_ids[:e.positive.prompt_length] for e in encoded], 0)
    grown, length = 0, 0
    for step in range(200):
        for e in encoded[:20]:
            original = e.positive.input_ids[:e.positive.prompt_length]
            out = noise.apply(original, e.example_id, step)
            if out is original:
                continue
            start, stop = noise.text_span(original)
            grown += len(out) - len(original)
            length += stop - start
    assert 0.15 <= grown / length <= 0.25  # insertions: p / 2 = 0.2 per token


def test_every_row_of_an_example_shares_its_disturbed_prompt(toy_setup):
    world, tokenizer, examples, encoded, normal = toy_setup
    maker = maker_for(toy_setup)
    step = next(s for s in range(1, 50) if maker.disturbed(encoded[0], s) is not encoded[0])
    batch = maker.make([0, 1], step, 0, 0)
    sequences = batch["layout"].sequences
    disturbed = maker.disturbed(encoded[0], step)
    prompt = disturbed.positive.input_ids[:disturbed.positive.prompt_length]
    rows = [0] + batch["negative_rows"][0][batch["negative_mask"][0]].tolist()
    rows += batch["recovery_rows"][batch["recovery_example"] == 0].tolist()
    for row in rows:
        assert sequences[row].token_ids[:len(prompt)] == prompt
    # normal rows are never disturbed: they are the data's own pairs
    pairs = {tuple(p.input_ids) for p in encode_normal(normal, tokenizer, FORMAT, 64)}
    for row in batch["normal_rows"].tolist():
        assert tuple(sequences[row].token_ids) in pairs


def test_draws_are_seeded_per_step_and_example_and_rate_zero_is_off(toy_setup):
    world, tokenizer, examples, encoded, normal = toy_setup
    a, b = maker_for(toy_setup), maker_for(toy_setup)
    draws = [[a.disturbed(e, s).positive.input_ids for e in encoded[:5]] for s in range(1, 6)]
    assert draws == [[b.disturbed(e, s).positive.input_ids for e in encoded[:5]] for s in range(1, 6)]
    assert len({tuple(x) for step in draws for x in step}) > 5  # steps and examples draw apart
    off = maker_for(toy_setup, prompt_noise=0)
    assert all(off.disturbed(e, s) is e for e in encoded[:5] for s in range(1, 6))
    assert off.noise is None
    with pytest.raises(ValueError, match="prompt_noise"):
        method_class("wpn").Options(prompt_noise=1.5)


def test_the_format_is_found_with_a_subword_tokenizer():
    """A BPE tokenizer writes the format's tail with its leading space in the prompt: the span of the
    prompt's own text still stops before it."""
    tokenizer = models.load_tokenizer("tiny-opt")
    fmt = "### Question: {prompt} ### Answer:"
    prompt_ids = tokenizer(fmt.format(prompt="how do i bake bread"), add_special_tokens=True)["input_ids"]
    noise = PromptNoise(0.4, tokenizer, fmt, [prompt_ids], 0)
    start, stop = noise.text_span(prompt_ids)
    assert tokenizer.decode(prompt_ids[start:stop]).strip() == "how do i bake bread"
    assert tokenizer.decode(prompt_ids[stop:]).strip() == "### Answer:"
    assert sorted(noise.pool) == sorted(set(prompt_ids[start:stop]))


def test_the_default_rate_needs_normal_data():
    """0.4 with normal data (the toy world has its own); off without, like the retain, retention and
    recovery terms (without a retain term the noise made the toy model refuse the normal questions)."""
    for toy_world, normal, rate in ((True, False, 0.4), (False, True, 0.4), (False, False, 0.0)):
        options = method_class("wpn").Options()
        options.resolve_defaults(toy_world=toy_world, has_normal_data=normal)
        assert options.prompt_noise == rate
    explicit = method_class("wpn").Options(prompt_noise=0.2)
    explicit.resolve_defaults(toy_world=False, has_normal_data=False)
    assert explicit.prompt_noise == 0.2


def test_a_wrap_puts_a_run_of_pool_tokens_on_one_side_of_the_noised_text(toy_setup):
    """--prompt_noise_wrap: with the same seed, a wrapped prompt is the unwrapped one's disturbed text
    with a run of pool tokens before it or after it, at most twice as long as that text; about the
    given share of the disturbed prompts is wrapped, on both sides; a wrap of 0 changes nothing."""
    world, tokenizer, examples, encoded, normal = toy_setup
    prompts = [e.positive.input_ids[:e.positive.prompt_length] for e in encoded]
    plain = PromptNoise(0.4, tokenizer, FORMAT, prompts, 0)
    wrapped = PromptNoise(0.4, tokenizer, FORMAT, prompts, 0, wrap=0.5)
    unwrapped = PromptNoise(0.4, tokenizer, FORMAT, prompts, 0, wrap=0.0)
    pool = set(plain.pool)
    sides, disturbed = {"before": 0, "after": 0}, 0
    for step in range(100):
        for e, original in zip(encoded[:20], prompts):
            base = plain.apply(original, e.example_id, step)
            assert unwrapped.apply(original, e.example_id, step) == base
            out = wrapped.apply(original, e.example_id, step)
            if base is original:
                assert out is original  # the same examples are disturbed
                continue
            disturbed += 1
            start, stop = plain.text_span(original)
            text = base[start:len(base) - (len(original) - stop)]
            new = out[start:len(out) - (len(original) - stop)]
            assert out[:start] == base[:start] and out[len(out) - (len(original) - stop):] == original[stop:]
            extra = len(new) - len(text)
            if extra == 0:
                assert new == text
                continue
            assert 1 <= extra <= 2 * len(text)
            if new[extra:] == text and set(new[:extra]) <= pool:
                sides["before"] += 1
            else:
                assert new[:len(text)] == text and set(new[len(text):]) <= pool
                sides["after"] += 1
    assert 0.4 <= sum(sides.values()) / disturbed <= 0.6
    assert min(sides.values()) >= 0.35 * sum(sides.values())
    assert maker_for(toy_setup, prompt_noise_wrap=0.5).noise.wrap == 0.5  # the option reaches the batches
    with pytest.raises(ValueError, match="prompt_noise_wrap"):
        method_class("wpn").Options(prompt_noise_wrap=2)


def test_a_long_wrap_is_cut_to_the_toy_models_positions(toy_setup):
    """The toy world's --max_length is the toy model's position table: a prompt wrapped to more than
    that leaves its example as written (no room for a response), and no packed row of any step is
    longer than the model can take."""
    from wpn_dist.app.data import TOY_CONTEXT
    world, tokenizer, examples, _, normal = toy_setup
    encoded, _, _ = encode_examples(examples, tokenizer, FORMAT, TOY_CONTEXT)
    options = wpn_options(recovery_cuts=3, retain_weight=1.0, prompt_noise=1.0, prompt_noise_wrap=1.0)
    method = build_method("wpn", options)
    maker = BatchMaker(encoded, examples, tokenizer, FORMAT, TOY_CONTEXT, method.row_groups(), normal, seed=0,
                       **method.batch_options())
    lengths = [len(s.token_ids) for step in range(1, 30) for s in maker.make(list(range(8)), step, 0, 0)["layout"].sequences]
    assert max(lengths) <= TOY_CONTEXT
    assert max(lengths) > 40  # the wraps did make long rows
