"""What a method is: its options, the rows its batch carries, its loss terms and its hooks.

A method plugin is one module in this package holding one ``Method`` subclass decorated with
``@register``. The trainer asks the method, never the method's name:

- ``Options``: a dataclass of the method's own options (help text per field; they appear in
  ``--help`` of every command line that trains, and in the run's ``config.json``);
- ``row_groups()``: the extra row groups its packed batch carries beyond each example's positive and
  negatives (``normal``: normal-data rows, ``random``: harmful prompts with random normal answers,
  ``anchor``: prompts with the model's own continuation, ``recovery``: a harmful answer cut short and
  continued with the harmless one; ``batch_options()`` sizes them);
- ``needs_reference()``: whether it needs the frozen original model (a second engine);
- ``loss_terms(model, batch, reference)``: ``{"loss/total": tensor, "loss/<term>": tensor, ...}``
  from ONE forward of ``model`` over the packed batch (every term is logged);
- hooks the trainer calls with a ``TrainingRun`` (below): ``on_epoch_start`` before every epoch,
  the first included; ``on_step_start`` before every optimizer step.
"""
from dataclasses import dataclass
from typing import Protocol

import torch


class TrainingRun(Protocol):
    """What a hook may see and change of the run that calls it (the trainer implements it)."""

    step: int            # the step about to run (on_step_start) or the next one (on_epoch_start)
    first_step: int      # the first step of this process (after a resume: the step after the checkpoint)
    epoch: int

    def examples(self) -> list:
        """The training examples (wpn_dist.app.data.Example), in data order."""

    def generate(self, prompts: list) -> list:
        """The current model's greedy continuations of ``prompts`` (collective: every rank calls it)."""

    def set_epoch_subset(self, indices: list) -> None:
        """Restrict the epoch that starts now to these example indices (an empty list ends training)."""

    def set_anchors(self, continuations: dict) -> None:
        """example id -> text: the rows of the ``anchor`` group."""

    def log(self, message: str) -> None:
        """One line in the run's log (rank 0)."""


@dataclass
class NoOptions:
    """A method without options of its own."""


class Method:
    name = ""
    Options = NoOptions

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def row_groups(self) -> tuple:
        return ()

    def needs_reference(self) -> bool:
        return False

    def batch_options(self) -> dict:
        """Keyword options of the batch maker for the method's row groups (e.g. WPN's recovery cuts)."""
        return {}

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        raise NotImplementedError

    def on_epoch_start(self, run: TrainingRun) -> None:
        pass

    def on_step_start(self, run: TrainingRun) -> None:
        pass

    def log_values(self) -> dict:
        """Scalars to log beside the loss terms (host values: no sync)."""
        return {}


# --- helpers the methods share ---------------------------------------------------------------

def normalizer(batch: dict, key: str):
    """The batch's normalizer for ``key`` (set by the trainer's step plan), or None: a plain mean."""
    return batch.get("normalizers", {}).get(key)


def row_weights(batch: dict, rows: torch.Tensor):
    """Weights of ``rows`` (0 for a padding copy already counted in the step), or None: all 1."""
    weights = batch.get("row_weights")
    return None if weights is None else weights[rows]


def forward(model, batch: dict, hidden_states: bool = False, logits: bool = True):
    """One forward over the whole packed batch. ``logits=False`` keeps only the last position's logits
    (transformers' ``logits_to_keep``), for terms that read hidden states only."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 output_hidden_states=hidden_states, logits_to_keep=0 if logits else 1)


@torch.no_grad()
def reference_logits(reference, batch: dict, rows: torch.Tensor) -> torch.Tensor:
    out = reference(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows])
    return out.logits


def harmful_rows(batch: dict) -> torch.Tensor:
    return batch["negative_rows"][batch["negative_mask"]]


def positive_rows(batch: dict) -> torch.Tensor:
    return torch.arange(batch["example_ids"].shape[0], device=batch["input_ids"].device)


def total(terms: dict, weights: dict) -> dict:
    terms["loss/total"] = sum(weights[name] * terms[f"loss/{name}"] for name in weights)
    return terms
