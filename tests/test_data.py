import os

import pytest
import torch

from wpn_dist.app import toy_world as toy
from wpn_dist.app.config import parse_config
from wpn_dist.app.data import ShardedSampler, detect_format, encode_examples, pack_batch, read_jsonl, read_pku_saferlhf
from wpn_dist.app.models import byte_level_tokenizer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def test_pku_saferlhf_schema_groups_by_prompt():
    path = os.path.join(DATA, "pku_sample.jsonl")
    assert detect_format(path) == "pku"
    examples, skipped = read_pku_saferlhf(path)
    by_prompt = {e.prompt: e for e in examples}
    shed = by_prompt["How can I get into my neighbour's shed?"]
    assert shed.harmless == "You should ask your neighbour for permission."
    assert shed.harmful == ["Break the lock with a crowbar at night.", "Climb over the fence when nobody is home.",
                            "Pick the padlock with two pins."]
    assert "What is a good recipe for bread?" not in by_prompt  # no unsafe response
    assert (len(examples), skipped) == (3, 1)


def test_jsonl_reader():
    path = os.path.join(DATA, "tiny.jsonl")
    assert detect_format(path) == "jsonl"
    examples = read_jsonl(path)
    assert [len(e.harmful) for e in examples] == [2, 1, 3, 1, 2]
    assert all(e.group is None for e in examples)


def test_jsonl_rows_may_name_their_group(tmp_path):
    """The optional "group" (WPN's tamper term keeps a group on one side of its attack split); the toy
    world's rows are grouped by topic."""
    path = tmp_path / "grouped.jsonl"
    path.write_text('{"prompt": "p", "harmless": "no", "harmful": ["yes"], "group": "locks"}\n'
                    '{"prompt": "q", "harmless": "no", "harmful": ["yes"]}\n')
    assert [e.group for e in read_jsonl(str(path))] == ["locks", None]
    world = toy.make_world(toy.ToyWorldConfig(seed=0))
    rows = world.unlearning_rows()
    assert {r["group"] for r in rows} == set(world.topics)
    assert all(r["group"] in r["harmless"] for r in rows)  # the refusal names its topic


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_pack_batch_puts_every_sequence_in_one_batch(layout):
    tok = byte_level_tokenizer()
    encoded, _, _ = encode_examples(read_jsonl(os.path.join(DATA, "tiny.jsonl"))[:3], tok, "Q: {prompt} A:", 128)
    batch = pack_batch(encoded, tok.pad_token_id, layout=layout)
    sequences = batch["layout"].sequences
    assert len(sequences) == 3 + (2 + 1 + 3)
    assert batch["negative_rows"].tolist() == [[3, 4, 0], [5, 0, 0], [6, 7, 8]]
    assert batch["negative_mask"].tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    first = encoded[0].positive
    assert sequences[0].token_ids == first.input_ids and sequences[0].prompt_length == first.prompt_length
    response = batch["layout"].span([0])
    assert tok.decode(batch["layout"].token_ids[response.flat_host].tolist()).strip() == "i can not help with that.</s>"
    # Each negative starts with its example's prompt: packed, the prompt is in the row once.
    assert sequences[3].parent == 0 and sequences[3].shared == first.prompt_length
    executed = batch["layout"].num_executed_tokens()
    every = sum(len(s.token_ids) for s in sequences)
    if layout == "packed":
        assert executed == every - sum(e.positive.prompt_length * len(e.negatives) for e in encoded)
    else:
        assert executed == len(sequences) * max(len(s.token_ids) for s in sequences) > every


def test_sampler_pads_by_repetition_and_splits_ranks():
    shards = [ShardedSampler(10, 2, rank, 3, seed=0).micro_batches(epoch=0) for rank in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]  # ceil(10 / 6) micro-batches each
    seen = [i for s in shards for mb in s for i in mb]
    assert len(seen) == 12 and set(seen) == set(range(10))
    assert ShardedSampler(10, 2, 0, 3, 0).micro_batches(1) != shards[0]  # reshuffled per epoch
    assert ShardedSampler(10, 2, 0, 3, 0).micro_batches(0) == shards[0]  # deterministic


def test_config_precedence_file_then_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 7\nlr: 0.01\nglobal_negatives: false\n")
    cfg = parse_config(["--config", str(config), "--lr", "0.02"])
    assert (cfg.train.steps, cfg.train.lr, cfg.method_options.global_negatives) == (7, 0.02, False)
    assert parse_config([]).train.steps == 120


def test_toy_world_is_seeded_and_its_judge_works():
    world = toy.make_world(toy.ToyWorldConfig(seed=3))
    assert toy.make_world(toy.ToyWorldConfig(seed=3)).heldout_pairs == world.heldout_pairs
    assert not set(world.heldout_pairs) & set(world.train_pairs)
    topic = world.topics[0]
    assert all(not world.judge(r) for r in world.harmful_responses(topic))
    assert world.judge(world.refusal(topic))
    tok = toy.make_tokenizer(world)
    text = world.harmful_responses(topic)[0]
    assert tok.unk_token_id not in tok(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text
