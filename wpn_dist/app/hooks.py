"""Points where code outside the package can act on a training run: the tests' fault injection
uses them, and so can a user's plugin. ``WPN_DIST_HOOKS=module:attribute`` names a class (or a
zero-argument factory) whose instance the trainer calls; unset, the hooks do nothing."""
import importlib
import os


class Hooks:
    """Override any of these; each is called on every rank."""

    def loss(self, step: int, loss):
        """The micro-batch's total loss before the finite check and backward (returns the loss to use)."""
        return loss

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` and its logging, before the stop check and any checkpoint."""

    def during_save(self, step: int, phase: str) -> None:
        """Inside a checkpoint save; ``phase`` is ``"shards_written"`` (this rank's files are on disk,
        no manifest yet)."""


def load_hooks() -> Hooks:
    spec = os.environ.get("WPN_DIST_HOOKS", "")
    if not spec:
        return Hooks()
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"WPN_DIST_HOOKS={spec!r}: expected module:attribute")
    return getattr(importlib.import_module(module_name), attribute)()
