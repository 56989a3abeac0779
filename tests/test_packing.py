"""The packed layout against independent references: the token positions it hands the methods, its
segment-sum pooling against the mask pooling, and a packed forward of tiny OPT and GPT-Neo (with a
local-attention window shorter than the sequences) against each sequence run alone."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from wpn_dist.app import models
from wpn_dist.core import packed_attention
from wpn_dist.core.packing import Layout, Sequence, pool_tokens
from wpn_dist.core.pooling import pool


def tree_of_sequences(seed=0):
    """Three examples: a positive, two negatives sharing its prompt, a row continuing the second
    negative after a cut; then a normal row of its own."""
    rng = random.Random(seed)
    sequences = []
    for _ in range(3):
        prompt = [rng.randrange(5, 200) for _ in range(rng.randrange(3, 9))]
        root = len(sequences)
        sequences.append(Sequence(prompt + [rng.randrange(5, 200) for _ in range(rng.randrange(2, 15))], len(prompt)))
        for _ in range(2):
            sequences.append(Sequence(prompt + [rng.randrange(5, 200) for _ in range(rng.randrange(2, 15))],
                                      len(prompt), root, len(prompt)))
        cut = len(prompt) + 2
        sequences.append(Sequence(sequences[-1].token_ids[:cut] + [7, 8, 9], cut, len(sequences) - 1, cut))
    sequences.append(Sequence([3, 4, 5, 6, 7, 8], 2))
    return sequences


@pytest.mark.parametrize("kind", ["packed", "padded"])
def test_positions_read_back_every_sequence(kind):
    sequences = tree_of_sequences()
    layout = Layout(sequences, kind, pad_id=1)
    rows = range(len(sequences))
    every = layout.every_token(rows)
    for r, s in enumerate(sequences):
        assert layout.token_ids[every.flat_host[every.row == r]].tolist() == s.token_ids
    targets = layout.targets(rows)
    for r, s in enumerate(sequences):
        mine = targets.row == r
        assert targets.labels[mine].tolist() == s.token_ids[s.prompt_length:]
        assert layout.token_ids[targets.flat_host[mine]].tolist() == s.token_ids[s.prompt_length - 1:-1]
    if kind == "packed":  # each distinct token once: shared starts are not stored again
        assert layout.num_executed_tokens() == sum(len(s.token_ids) - s.shared for s in sequences)
    sub = layout.select([0, 2, 3])  # a positive, a negative sharing its prompt, a row cut from that negative
    assert [s.token_ids for s in sub.sequences] == [sequences[i].token_ids for i in (0, 2, 3)]
    assert [s.parent for s in sub.sequences] == [-1, 0, 1]
    assert layout.select([3]).sequences[0].parent == -1  # its parent left out: it stands alone


@pytest.mark.parametrize("mode", ["weighted", "mean", "last"])
def test_segment_pooling_equals_mask_pooling(mode):
    sequences = tree_of_sequences()
    padded, packed = Layout(sequences, "padded"), Layout(sequences, "packed")
    width = padded.input_ids.shape[1]
    # One state per distinct token (as a causal model computes), laid out both ways.
    flat_hidden = torch.randn(packed.num_executed_tokens(), 8)
    hidden = torch.zeros(len(sequences) * width, 8)
    every_padded, every_packed = padded.every_token(range(len(sequences))), packed.every_token(range(len(sequences)))
    hidden[every_padded.flat_host] = flat_hidden[every_packed.flat_host]
    hidden = hidden.view(len(sequences), width, 8)
    response_mask = torch.zeros(len(sequences), width)
    for r, s in enumerate(sequences):
        response_mask[r, s.prompt_length:len(s.token_ids)] = 1
    expected = pool(hidden, response_mask, mode)
    span = range(len(sequences))
    torch.testing.assert_close(pool_tokens(hidden.flatten(0, 1), padded.span(span), mode), expected)
    torch.testing.assert_close(pool_tokens(flat_hidden, packed.span(span), mode), expected)


def tiny(name):
    if name in OTHER_ARCHITECTURES:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(OTHER_ARCHITECTURES[name]()).eval()
    tokenizer = models.byte_level_tokenizer()
    config = models.build_config(models.MODEL_SPECS[name], vocab_size=len(tokenizer), tokenizer=tokenizer)
    if name == "tiny-gpt-neo":
        config.window_size = 12  # the local layer's window is shorter than the longer sequences
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _gptj():
    from transformers import GPTJConfig
    return GPTJConfig(n_layer=2, n_embd=64, n_head=4, n_positions=512, rotary_dim=16, vocab_size=256,
                      bos_token_id=2, eos_token_id=2)


def _gpt_neox():
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                         vocab_size=256, max_position_embeddings=512, bos_token_id=2, eos_token_id=2)


def _llama_gqa():  # grouped-query attention: 2 key/value heads for 4 query heads
    from transformers import LlamaConfig
    return LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=256, bos_token_id=2, eos_token_id=2)


OTHER_ARCHITECTURES = {"gptj": _gptj, "gpt-neox": _gpt_neox, "llama-gqa": _llama_gqa}


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-gpt-neo", *OTHER_ARCHITECTURES])
def test_packed_forward_equals_each_sequence_alone(name):
    model = tiny(name)
    sequences = tree_of_sequences()
    layout = Layout(sequences, "packed")
    implementation = model.config._attn_implementation
    if name in OTHER_ARCHITECTURES and not packed_attention.install(model):
        # Older transformers build GPT-J without the attention interface: then nothing is changed, and
        # the trainer uses the padded layout.
        assert not packed_attention.installed(model) and model.config._attn_implementation == implementation
        return
    assert packed_attention.install(model)
    with torch.no_grad(), packed_attention.active(layout):
        packed_logits = model(**layout.model_inputs()).logits[0]
    every = layout.every_token(range(len(sequences)))
    with torch.no_grad():
        for r, s in enumerate(sequences):  # no layout active: the model's own attention
            alone = model(input_ids=torch.tensor([s.token_ids])).logits[0]
            torch.testing.assert_close(packed_logits[every.flat_host[every.row == r]], alone, atol=1e-5, rtol=1e-5)


def test_a_packed_batch_on_a_model_without_packed_attention_is_refused():
    from wpn_dist.core.methods import build_method
    from wpn_dist.core.methods.base import forward
    model = tiny("tiny-opt")
    batch = {"layout": Layout(tree_of_sequences(), "packed")}
    with pytest.raises(RuntimeError, match="packed attention"):
        forward(model, batch)
    assert build_method("lm")  # the registry is untouched


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-gpt-neo"])
def test_a_packed_row_may_be_longer_than_the_model_positions(name):
    """Positions are logical: a row of 7 sequences of 200 tokens (1100 distinct) on a 512-position model."""
    model = tiny(name)
    assert packed_attention.install(model)
    rng = random.Random(1)
    prompt = [rng.randrange(5, 200) for _ in range(50)]
    sequences = [Sequence(prompt + [rng.randrange(5, 200) for _ in range(150)], 50)]
    sequences += [Sequence(prompt + [rng.randrange(5, 200) for _ in range(150)], 50, 0, 50) for _ in range(6)]
    layout = Layout(sequences, "packed")
    assert layout.num_executed_tokens() == 1100 > model.config.max_position_embeddings
    with torch.no_grad(), packed_attention.active(layout):
        packed_logits = model(**layout.model_inputs()).logits[0]
        with pytest.raises(RuntimeError, match="outside packed_attention.active"):
            model(input_ids=torch.tensor([sequences[-1].token_ids]))  # another forward under the layout
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([sequences[-1].token_ids])).logits[0]
    last = layout.every_token([len(sequences) - 1])
    torch.testing.assert_close(packed_logits[last.flat_host], alone, atol=1e-5, rtol=1e-5)


def test_an_architecture_not_known_exact_is_not_installed():
    """BLOOM carries ALiBi in its attention mask, which packed attention does not rebuild: padded it stays."""
    from transformers import BloomConfig
    model = AutoModelForCausalLM.from_config(BloomConfig(n_layer=1, hidden_size=32, n_head=4, vocab_size=256))
    assert not packed_attention.install(model) and not packed_attention.installed(model)
