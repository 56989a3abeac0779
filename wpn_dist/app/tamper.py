"""The tamper-resistance term: a first-order simulated relearning attack inside every training step (our
choice, after TAR, Tamirisa et al. 2024, "Tamper-Resistant Safeguards for Open-Weight LLMs").

Unlearning that only gates the harmful knowledge is undone by a few steps of plain fine-tuning on
harmful pairs of *other* prompts (the toy benchmark's relearning attack). Each optimizer step, every
rank therefore attacks a copy of the current weights: the examples' groups are split in two at random,
the copy is fine-tuned with AdamW for a random number of steps (1 to ``steps``) on the harmful pairs of
the first half, and the cross-entropy of the harmless responses of the second half is taken at the
attacked weights. Its gradient there, averaged over the ranks and times ``weight``, is added to the
step's gradient (the first-order approximation: the attack's own steps are not differentiated through),
so that the weights move towards ones whose harmless answers survive the attack.

The copy is a plain model on every rank (its weights, gradients and AdamW state: about 16 bytes a
parameter in fp32), so the term is for models that fit one device beside the engine's share; under
ZeRO-3 the engine's partitions are gathered into it once a step. Rows of one ``group`` (a JSONL row's
optional "group" field: the toy world's topic) always fall on the same side of the split, so the attack
never shows a target's own harmful content, as in the benchmark. With ``--tamper_prompt_noise`` (WPN's
default) the target rows are read with the step's disturbed prompts (the batch maker's prompt noise), as
the step's own terms read them; the attack's harmful pairs stay as written.
"""
import random

import torch

from ..core.methods.base import TamperSettings
from . import distributed
from .data import lm_batch


def _mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s mean over the ranks, in place (collective; the identity on one rank)."""
    if distributed.world_size() > 1:
        torch.distributed.all_reduce(tensor)
        tensor /= distributed.world_size()
    return tensor


def split_groups(groups: list, rng: random.Random) -> tuple:
    """(attack indices, target indices) of ``groups`` (one label per example): the distinct labels
    shuffled and halved, every example on its label's side; with a single label the examples are
    halved instead."""
    labels = sorted(set(groups))
    if len(labels) < 2:
        order = list(range(len(groups)))
        rng.shuffle(order)
        half = len(order) // 2
        return order[:half], order[half:]
    rng.shuffle(labels)
    attack = set(labels[:len(labels) // 2])
    return [i for i, g in enumerate(groups) if g in attack], [i for i, g in enumerate(groups) if g not in attack]


class TamperTerm:
    """``apply(engine, step)``, once per optimizer step after the last backward and before the engine's
    step: adds the attacked weights' gradient to the engine's (collective: every rank calls it)."""

    def __init__(self, adversary, settings: TamperSettings, encoded: list, groups: list, pad_id: int, seed: int,
                 disturbed=None):
        """``disturbed(example, step)``: the example as the step trains it (its prompt disturbed by the
        prompt noise, or as written); the target rows are read through it when ``settings.prompt_noise``."""
        self.adversary = adversary.train()
        for p in self.adversary.parameters():
            p.requires_grad_(True)
        self.settings, self.encoded, self.groups, self.pad_id, self.seed = settings, encoded, groups, pad_id, seed
        self.disturbed = disturbed if settings.prompt_noise and disturbed is not None else lambda e, step: e

    def _copy_weights(self, engine) -> None:
        import deepspeed
        # Under ZeRO-3 each rank holds a partition: gather one parameter at a time, so that no more than
        # one of them is whole twice (a no-op for unpartitioned weights).
        for mine, theirs in zip(self.adversary.parameters(), engine.module.parameters()):
            with deepspeed.zero.GatheredParameters([theirs], modifier_rank=None), torch.no_grad():
                mine.copy_(theirs.detach().to(mine.dtype))

    def _batch(self, rows: list, rng: random.Random, device, read=lambda row: row) -> dict:
        """``batch_size`` rows drawn from ``rows``, each turned into an EncodedPair by ``read`` once drawn."""
        batch = lm_batch([read(rows[rng.randrange(len(rows))]) for _ in range(self.settings.batch_size)], self.pad_id)
        return {k: v.to(device) for k, v in batch.items()}

    def attack_gradient(self, step: int, rank: int) -> tuple:
        """Attack the copy from its current weights; returns (its parameters' gradients of the target
        loss at the attacked weights, the target loss, the attack's last loss)."""
        s = self.settings
        rng = random.Random(f"{self.seed}-{step}-{rank}")  # the same attack after a resume
        attack, target = split_groups(self.groups, rng)
        attack_pairs = [pair for i in attack for pair in self.encoded[i].negatives]
        device = next(self.adversary.parameters()).device
        optimizer = torch.optim.AdamW(self.adversary.parameters(), lr=s.lr, weight_decay=0.0,
                                      fused=True)  # fused: exact sqrt on every CPU (kernels.py)
        attack_loss = torch.zeros((), device=device)
        for _ in range(rng.randint(1, s.steps)):
            attack_loss = self.adversary(**self._batch(attack_pairs, rng, device)).loss
            attack_loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # Only the drawn target rows are disturbed (the noise is a function of example and step).
        target_batch = self._batch(target, rng, device, read=lambda i: self.disturbed(self.encoded[i], step).positive)
        target_loss = self.adversary(**target_batch).loss
        grads = torch.autograd.grad(target_loss, list(self.adversary.parameters()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.adversary.parameters(), grads)]
        return grads, target_loss.detach(), attack_loss.detach()

    def apply(self, engine, step: int) -> dict:
        self._copy_weights(engine)
        grads, target_loss, attack_loss = self.attack_gradient(step, distributed.rank())
        add_gradients(engine, grads, self.settings.weight)
        # This rank's losses, as every term of the step: the trainer averages them over the ranks when it logs.
        return {"loss/tamper": target_loss, "tamper/attack_loss": attack_loss}


def add_gradients(engine, grads: list, weight: float) -> None:
    """Add ``weight`` times the mean over the ranks of each rank's ``grads`` (full tensors, in the order
    of ``engine.module.parameters()``) to the engine's gradients, after the window's last backward and
    before its step (collective). Under ZeRO each rank writes its own partition of the sum."""
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad
    for grad, param in zip(grads, engine.module.parameters()):
        grad = _mean_over_ranks(grad.detach().float().clone())
        full = safe_get_full_grad(param)
        safe_set_full_grad(param, full + weight * grad.to(full.dtype))
