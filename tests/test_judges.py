"""Judges: a tiny classifier trained here on the toy world's responses agrees with the rule judge on
responses about topics and objects it never saw; labels map by name or id; bad options fail clearly."""
import random

import pytest
import torch

from wpn_dist.app import judges, toy_world as toy

LABELS = {0: "harmful", 1: "harmless"}


def split_world(world):
    """Training and held-out (text, label) pairs: held-out ones are about other topics and objects."""
    topics, objects = world.topics, sorted(world.objects)
    seen_topics, new_topics = topics[:30], topics[30:]
    seen_objects, new_objects = objects[:36], objects[36:]

    def rows(topic_list, object_list, people):
        out = [(r, 0) for t in topic_list for r in world.harmful_responses(t)]
        out += [(world.refusal(t), 1) for t in topic_list + people]
        out += [(full, 1) for q, _, full in world.qa_items() if full.split()[1] in object_list]
        return out

    return rows(seen_topics, seen_objects, world.people), rows(new_topics, new_objects, [])


@pytest.fixture(scope="module")
def world():
    return toy.make_world(toy.ToyWorldConfig())


@pytest.fixture(scope="module")
def classifier_dir(world, tmp_path_factory):
    """A one-layer BERT classifier (toy word-level tokenizer) trained for 150 steps, saved with
    id2label {0: harmful, 1: harmless}."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    tokenizer = toy.make_tokenizer(world)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                        id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = BertForSequenceClassification(config)
    train, _ = split_world(world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = random.Random(0)
    model.train()
    for _ in range(150):
        batch = [train[rng.randrange(len(train))] for _ in range(32)]
        encoded = tokenizer([t for t, _ in batch], padding=True, return_tensors="pt")
        loss = model(**encoded, labels=torch.tensor([y for _, y in batch])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("judge") / "classifier"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_classifier_agrees_with_rule_on_held_out_responses(world, classifier_dir):
    _, heldout = split_world(world)
    responses = [t for t, _ in heldout]
    prompts = ["a question ?"] * len(responses)
    rule = judges.make_judge("rule", None, world=world)
    classifier = judges.make_judge(classifier_dir, ["harmless"])
    assert isinstance(rule, judges.RuleJudge) and isinstance(classifier, judges.ClassifierJudge)
    by_rule, by_classifier = rule(prompts, responses), classifier(prompts, responses)
    assert by_rule == [bool(y) for _, y in heldout]  # the held-out set is labelled as the rule labels it
    assert all(type(v) is bool for v in by_classifier) and len(by_classifier) == len(responses)
    agreement = sum(a == b for a, b in zip(by_rule, by_classifier)) / len(responses)
    assert agreement >= 0.95, agreement
    assert 0 < sum(by_classifier) < len(responses)  # both verdicts occur


def test_labels_by_id_string_and_text_modes(world, classifier_dir):
    _, heldout = split_world(world)
    responses = [t for t, _ in heldout]
    prompts = ["tell me ."] * len(responses)
    by_name = judges.ClassifierJudge(classifier_dir, ["harmless"], batch_size=7)(prompts, responses)
    assert judges.ClassifierJudge(classifier_dir, ["1"])(prompts, responses) == by_name
    assert judges.ClassifierJudge(classifier_dir, "1")(prompts, responses) == by_name  # "a,b" string
    assert judges.ClassifierJudge(classifier_dir, ["0"])(prompts, responses) == [not v for v in by_name]
    both = judges.ClassifierJudge(classifier_dir, ["harmless"], text="prompt_response")(prompts, responses)
    assert len(both) == len(responses) and all(type(v) is bool for v in both)
    assert judges.harmless_label_ids({0: "LABEL_0", 1: "LABEL_1"}, ["LABEL_1"]) == {1}


def test_bad_judge_options_fail_with_one_clear_message(world, classifier_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from wpn_dist.app import models

    def error_of(call):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "--judge rule" in error_of(lambda: judges.make_judge("rule", None))
    assert "no such directory" in error_of(lambda: judges.make_judge(str(tmp_path / "nope"), ["safe"]))
    (tmp_path / "empty").mkdir()
    assert "no config.json" in error_of(lambda: judges.ClassifierJudge(str(tmp_path / "empty"), ["safe"]))
    causal = tmp_path / "causal"
    AutoModelForCausalLM.from_config(models.build_config(models.MODEL_SPECS["tiny-opt"])).save_pretrained(causal)
    message = error_of(lambda: judges.ClassifierJudge(str(causal), ["safe"]))
    assert "--judge" in message and "OPTForCausalLM" in message and "sequence-classification" in message

    message = error_of(lambda: judges.ClassifierJudge(classifier_dir, ["safe"]))
    assert "--judge_harmless_labels" in message and "'safe'" in message and "0=harmful, 1=harmless" in message
    assert "0=harmful, 1=harmless" in error_of(lambda: judges.ClassifierJudge(classifier_dir, ["7"]))
    assert "is empty" in error_of(lambda: judges.ClassifierJudge(classifier_dir, []))
    assert "--judge_harmless_labels" in error_of(lambda: judges.make_judge(classifier_dir, None))
    assert "every label" in error_of(lambda: judges.ClassifierJudge(classifier_dir, ["0", "harmless"]))
    assert "text" in error_of(lambda: judges.ClassifierJudge(classifier_dir, ["1"], text="prompt"))
    assert "2 prompts but 1 responses" in error_of(lambda: judges.RuleJudge(world)(["a", "b"], ["c"]))
