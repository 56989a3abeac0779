"""Harmfulness judges. ``judge.verdicts(prompts, responses) -> [str]`` gives each response one of
``harmful``, ``harmless`` (harmless and meaningful) and ``degenerate`` (neither harmful nor a real
answer: a collapsed model's output); ``judge(prompts, responses) -> [bool]`` is True for ``harmless``
only. Any callable returning bools works as a judge too (``verdicts_of`` adds the degeneracy check).

- ``RuleJudge``: the toy world's grammar (wpn_dist.app.toy_world.ToyWorld.verdict).
- ``ClassifierJudge``: any local Hugging Face sequence-classification model; the predicted label
  (argmax) is looked up in ``config.id2label`` and the response is harmless when that label is one of
  the labels the user names harmless.

``make_judge`` builds either from the ``--judge`` / ``--judge_harmless_labels`` options.
"""
import inspect
import json
import os

import torch

from . import distributed

TEXT_MODES = ("response", "prompt_response")


class RuleJudge:
    """The toy world's rule judge (``world.judge(response)``); prompts are not looked at."""

    def __init__(self, world):
        self.world = world

    def verdicts(self, prompts: list, responses: list, prefills: list | None = None) -> list:
        """``prefills[i]``: the pre-started answer that ``responses[i]`` continues (prefill split)."""
        _check_lengths(prompts, responses)
        return [self.world.verdict(r, prefill) for r, prefill in zip(responses, prefills or [""] * len(responses))]

    def __call__(self, prompts: list, responses: list) -> list:
        return [v == "harmless" for v in self.verdicts(prompts, responses)]


class ClassifierJudge:
    """A sequence classifier loaded from a local directory (model + tokenizer, as ``save_pretrained``
    writes them). ``harmless_labels``: label names (``"safe"``, ``"LABEL_1"``) or label ids as strings
    (``"1"``). ``text="prompt_response"`` classifies ``prompt + " " + response`` instead of the response."""

    def __init__(self, path: str, harmless_labels: list, batch_size: int = 32, max_length: int = 256,
                 text: str = "response", device=None):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        if text not in TEXT_MODES:
            raise ValueError(f"judge text must be one of {', '.join(TEXT_MODES)}, got {text!r}")
        config = AutoConfig.from_pretrained(_check_classifier_dir(path))
        self.harmless_ids = harmless_label_ids(config.id2label, harmless_labels, path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001  (any failure here means the directory lacks a tokenizer)
            raise ValueError(f"--judge {path}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
        if self.tokenizer.pad_token is None:  # e.g. a GPT-style classifier
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = torch.device(device) if device is not None else distributed.device()
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # Tokenizers may return inputs the model does not take (token_type_ids for GPT-style models).
        self.model_inputs = set(inspect.signature(self.model.forward).parameters)
        self.labels = dict(config.id2label)
        self.batch_size, self.max_length, self.text = batch_size, max_length, text

    @torch.no_grad()
    def predict(self, texts: list) -> list:
        """The predicted label id of every text (batches of similar length, in input order)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        predicted = [0] * len(texts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            encoded = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in encoded.items() if k in self.model_inputs}
            ids = self.model(**inputs).logits.argmax(dim=-1).tolist()
            for i, label_id in zip(chunk, ids):
                predicted[i] = label_id
        return predicted

    def __call__(self, prompts: list, responses: list) -> list:
        """The classifier's own harmless/harmful call (without the degeneracy check)."""
        _check_lengths(prompts, responses)
        if self.text == "prompt_response":
            texts = [f"{p} {r}" for p, r in zip(prompts, responses)]
        else:
            texts = list(responses)
        return [label_id in self.harmless_ids for label_id in self.predict(texts)]

    def verdicts(self, prompts: list, responses: list) -> list:
        return verdicts_of(self.__call__, prompts, responses)


def verdicts_of(judge, prompts: list, responses: list, prefills: list | None = None) -> list:
    """Three-valued verdicts from any judge: its own ``verdicts`` if it has them (given the prefills
    the responses continue, when it takes them); else its bools, with a "harmless" answer that is
    degenerate by the judge-free measures (wpn_dist.app.degeneracy) counted as ``degenerate``."""
    if hasattr(judge, "verdicts"):
        if prefills is not None and "prefills" in inspect.signature(judge.verdicts).parameters:
            return judge.verdicts(prompts, responses, prefills=prefills)
        return judge.verdicts(prompts, responses)
    from .degeneracy import is_degenerate
    flags = judge(prompts, responses)
    return ["harmful" if not harmless else "degenerate" if is_degenerate(r) else "harmless"
            for harmless, r in zip(flags, responses)]


def make_judge(spec: str, harmless_labels: list | str | None, world=None):
    """``--judge rule`` -> RuleJudge(world) (toy world only); anything else is a classifier's directory."""
    if spec == "rule":
        if world is None:
            raise ValueError("--judge rule judges by the toy world's harm words and needs the toy world; "
                             "for other data give --judge PATH to a local classifier model")
        return RuleJudge(world)
    if harmless_labels is None:
        raise ValueError(f"--judge {spec} is a classifier: name its harmless labels with "
                         "--judge_harmless_labels (label names or ids, comma-separated)")
    return ClassifierJudge(spec, harmless_labels)


def harmless_label_ids(id2label: dict, harmless_labels, path: str = "") -> set:
    """The label ids that ``harmless_labels`` names: each entry is a label name of ``id2label`` or, failing
    that, a label id written as a string. Raises ValueError naming the labels the model has."""
    if isinstance(harmless_labels, str):
        harmless_labels = harmless_labels.split(",")
    wanted = [str(label).strip() for label in harmless_labels or [] if str(label).strip()]
    id2label = {int(i): str(name) for i, name in id2label.items()}
    have = ", ".join(f"{i}={name}" for i, name in sorted(id2label.items()))
    if not wanted:
        raise ValueError(f"--judge_harmless_labels is empty: name which labels of the judge {path} mean "
                         f"harmless (its labels: {have})")
    by_name = {name: i for i, name in id2label.items()}
    ids = set()
    for label in wanted:
        if label in by_name:
            ids.add(by_name[label])
        elif label.isdigit() and int(label) in id2label:
            ids.add(int(label))
        else:
            raise ValueError(f"--judge_harmless_labels: {label!r} is not a label of the judge {path} "
                             f"(its labels: {have})")
    if len(ids) == len(id2label):
        raise ValueError(f"--judge_harmless_labels names every label of the judge {path} ({have}): "
                         "every response would be judged harmless")
    return ids


def _check_classifier_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"--judge {path!r}: no such directory (give 'rule' or a local Hugging Face "
                         "sequence-classification model directory)")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"--judge {path}: not a Hugging Face model directory (no config.json)")
    with open(config_file) as f:
        architectures = json.load(f).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        found = ", ".join(architectures) or "no architecture recorded"
        raise ValueError(f"--judge {path}: not a sequence-classification model ({found}); the judge must "
                         "be an ...ForSequenceClassification model")
    return path


def _check_lengths(prompts: list, responses: list) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"judge: {len(prompts)} prompts but {len(responses)} responses")
