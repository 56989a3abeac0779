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
- ``tamper_settings()``: None, or the settings of the tamper-resistance term the trainer applies
  (wpn_dist.app.tamper);
- hooks the trainer calls with a ``TrainingRun`` (below): ``on_epoch_start`` before every epoch,
  the first included; ``on_step_start`` before every optimizer step.
"""
from dataclasses import dataclass
from typing import Protocol

import torch

from ..token_losses import cross_entropy_at, kl_at, token_nll_at


class TrainingRun(Protocol):
    """What a hook may see and change of the run that calls it (the trainer implements it)."""

    step: int            # the step about to run (on_step_start) or the next one (on_epoch_start)
    first_step: int      # the first step of this process (after a resume: the step after the checkpoint)
    epoch: int
    total_steps: int     # the run's optimizer steps (--steps)

    def examples(self) -> list:
        """The training examples (wpn_dist.app.data.Example), in data order."""

    def generate(self, prompts: list, prefills: list | None = None) -> list:
        """The current model's greedy continuations of ``prompts``, each answer pre-started with
        ``prefills[i]`` when given (collective: every rank calls it)."""

    def memorization_accuracy(self, rows: list) -> float:
        """The share of the response tokens of ``rows`` ({prompt, response}) the model predicts right,
        greedy and teacher-forced (collective)."""

    def set_epoch_subset(self, indices: list) -> None:
        """Restrict the epoch that starts now to these example indices (an empty list ends training)."""

    def set_anchors(self, continuations: dict) -> None:
        """example id -> text: the rows of the ``anchor`` group."""

    def log(self, message: str) -> None:
        """One line in the run's log (rank 0)."""


@dataclass
class TamperSettings:
    """The tamper-resistance term's settings (wpn_dist.app.tamper runs it)."""
    weight: float
    steps: int        # each simulated attack runs a number of steps drawn from 1..steps
    lr: float
    batch_size: int
    prompt_noise: bool = False  # the target rows get the step's disturbed prompts (the batch maker's noise)


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
        """Keyword options of the batch maker (wpn_dist.app.data.BatchMaker) for the method's rows: e.g.
        WPN's ``recovery_cuts``, or ``positive_responses=False`` for a method that never reads them."""
        return {}

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        raise NotImplementedError

    def tamper_settings(self):
        """None, or the TamperSettings of a simulated relearning attack whose
        gradient the trainer adds to every step's (it keeps a full copy of the model on every rank)."""
        return None

    def on_epoch_start(self, run: TrainingRun) -> None:
        pass

    def on_step_start(self, run: TrainingRun) -> None:
        pass

    def log_values(self) -> dict:
        """Scalars to log beside the loss terms (host values: no sync)."""
        return {}


# --- helpers the methods share ---------------------------------------------------------------
# A batch's ``layout`` (wpn_dist.core.packing.Layout) says where each sequence lies in the model's
# input; the methods address sequences by row (positives first, then negatives, then the extra
# groups), whatever the layout.

class Outputs:
    """One forward's results: hidden states by flat position, and the logits kept for the positions
    the terms asked for (``logits_at``/``index``)."""

    def __init__(self, out, kept: torch.Tensor | None):
        self.out, self.kept = out, kept
        # padded layout: full logits [S*T, V], indexed by flat position; packed: logits at ``kept``
        self.logits = None if out.logits is None else out.logits.flatten(0, 1)

    def hidden(self, layer: int) -> torch.Tensor:
        return self.out.hidden_states[layer].flatten(0, 1)

    def index(self, tokens) -> torch.Tensor:
        """Rows of ``self.logits`` holding the logits at ``tokens.flat``."""
        if self.kept is None:
            return tokens.flat
        return torch.searchsorted(self.kept, tokens.flat)

    def logits_at(self, tokens) -> torch.Tensor:
        return self.logits[self.index(tokens)]


def forward(model, batch: dict, hidden_states: bool = False, logits_for=()) -> Outputs:
    """One forward over the whole batch. ``logits_for``: the Tokens whose positions need logits. In
    the packed layout only those positions go through the LM head (transformers' ``logits_to_keep``
    with an index); the padded layout keeps every position, as it always did; with none asked, only
    the last position's logits are computed."""
    from ..packed_attention import active, installed
    layout = batch["layout"]
    if layout.kind == "packed" and not installed(model):
        raise RuntimeError("a packed batch needs a model with packed attention: call "
                           "wpn_dist.core.packed_attention.install(model) first, or use the padded layout")
    wanted = [t.flat_host for t in logits_for]
    kept, keep = None, 1
    if wanted and layout.kind == "padded":
        keep = 0
    elif wanted:
        kept = torch.unique(torch.cat(wanted)).to(layout.device)  # sorted; unique on the host: no device sync
        keep = kept
    with active(layout):
        out = model(**layout.model_inputs(), output_hidden_states=hidden_states, logits_to_keep=keep)
    return Outputs(out, kept)


@torch.no_grad()
def reference_logits(reference, batch: dict, rows: torch.Tensor) -> torch.Tensor:
    """The frozen reference's logits at every token of ``rows`` (row-major, as
    ``layout.every_token(rows)``), from a forward over those rows only."""
    sub = batch["layout"].select(rows)
    tokens = sub.every_token(range(len(sub.sequences)))
    return forward(reference, {"layout": sub}, logits_for=[tokens]).logits_at(tokens)


@torch.no_grad()
def reference_states(reference, batch: dict) -> Outputs:
    """The frozen reference's hidden states (``.hidden(layer)``) at every flat position of the batch
    (the same positions as the trained model's), from one forward over the whole batch."""
    return forward(reference, batch, hidden_states=True)


def sequence_nll(outputs: Outputs, rows: torch.Tensor, tokens) -> torch.Tensor:
    """[len(rows)] each row's summed next-token NLL over ``tokens`` (``layout.targets(rows)``)."""
    nll = token_nll_at(outputs.logits, outputs.index(tokens), tokens.labels)
    return torch.zeros(len(rows), device=nll.device, dtype=nll.dtype).index_add(0, tokens.row.to(nll.device), nll)


@torch.no_grad()
def reference_sequence_nll(reference, batch: dict, rows: torch.Tensor) -> torch.Tensor:
    """The frozen reference's ``sequence_nll`` of ``rows`` (their response tokens), from a forward over
    those rows only."""
    sub = batch["layout"].select(rows)
    every = torch.arange(len(sub.sequences))
    tokens = sub.targets(every)
    return sequence_nll(forward(reference, {"layout": sub}, logits_for=[tokens]), every, tokens)


def _weighted_mean(values: torch.Tensor, weights, batch: dict, key: str) -> torch.Tensor:
    summed = values.sum() if weights is None else (values * weights.to(values.device)).sum()
    count = normalizer(batch, key)
    return summed / (max(values.shape[0], 1) if count is None else count)


def row_mean(values: torch.Tensor, batch: dict, rows: torch.Tensor, key: str) -> torch.Tensor:
    """``sum_r weight_r values_r / normalizer(key)``: a per-row term's mean over the step's rows."""
    return _weighted_mean(values, row_weights(batch, rows), batch, key)


def token_mean(per_token: torch.Tensor, batch: dict, rows: torch.Tensor, tokens, key: str) -> torch.Tensor:
    """``sum_t weight_t per_token_t / normalizer(key)`` over ``tokens`` of ``rows``: a per-token term's
    mean over the step's tokens (a padding copy's tokens weigh 0)."""
    return _weighted_mean(per_token, token_weights(batch, rows, tokens), batch, key)


def token_weights(batch: dict, rows: torch.Tensor, tokens):
    """Per-token weights: the weight of the row each of ``tokens`` belongs to (None: all 1)."""
    weights = batch.get("row_weights")
    if weights is None:
        return None
    return weights[rows.to(weights.device)[tokens.row.to(weights.device)]]


def cross_entropy(outputs: Outputs, batch: dict, rows: torch.Tensor, tokens, key: str) -> torch.Tensor:
    """Mean next-token cross-entropy of ``tokens`` (targets of ``rows``), normalised by the step's ``key``."""
    return cross_entropy_at(outputs.logits, outputs.index(tokens), tokens.labels,
                            token_weights(batch, rows, tokens), normalizer(batch, key))


def kl(outputs: Outputs, batch: dict, rows: torch.Tensor, tokens, reference, key: str) -> torch.Tensor:
    """KL(reference || model) at every token of ``rows`` (``tokens``), normalised by the step's ``key``."""
    return kl_at(outputs.logits, outputs.index(tokens), reference_logits(reference, batch, rows),
                 token_weights(batch, rows, tokens), normalizer(batch, key))


def normalizer(batch: dict, key: str):
    """The batch's normalizer for ``key`` (set by the trainer's step plan), or None: a plain mean."""
    return batch.get("normalizers", {}).get(key)


def row_weights(batch: dict, rows: torch.Tensor):
    """Weights of ``rows`` (0 for a padding copy already counted in the step), or None: all 1."""
    weights = batch.get("row_weights")
    return None if weights is None else weights[rows.to(weights.device)]


def harmful_rows(batch: dict) -> torch.Tensor:
    return batch["negative_rows"][batch["negative_mask"]]


def positive_rows(batch: dict) -> torch.Tensor:
    return torch.arange(batch["example_ids"].shape[0])


def all_rows(batch: dict) -> torch.Tensor:
    return torch.arange(len(batch["layout"].sequences))


def total(terms: dict, weights: dict) -> dict:
    terms["loss/total"] = sum(weights[name] * terms[f"loss/{name}"] for name in weights)
    return terms
