"""WPN: the N-pair contrastive loss over position-weighted pooled hidden states, with auxiliary terms
that are our choices, not the paper's: positive LM, retain, recovery cuts inside the harmful responses
(their LM term, and a second N-pair term, off by default), representation retention on normal data, a
capped forget term (off by default) and a tamper-resistance term (on by default on the toy world only;
the trainer runs it, wpn_dist.app.tamper); and prompt noise on the training prompts
(wpn_dist.app.prompt_noise), also our choice. Their defaults come from the toy benchmark (README, "The
efficacy table")."""
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch

from ..contrastive import npair_loss
from ..packing import pool_tokens
from ..token_losses import token_nll_at
from . import register
from .base import (Method, TamperSettings, all_rows, cross_entropy, forward, harmful_rows, kl, normalizer, positive_rows,
                   reference_states, row_weights, token_mean, total)


@dataclass
class WPNOptions:
    # WPN's lr on the toy world (the trainer's --lr default there), tuned with the tamper term.
    toy_lr: ClassVar[float] = 3.5e-4
    pooling: Literal["weighted", "mean", "last"] = field(default="weighted", metadata={
        "help": "WPN: how hidden states are pooled over a span (position-weighted mean by default)."})
    anchor: Literal["prompt", "generation"] = field(default="prompt", metadata={
        "help": "WPN: span the anchor is pooled over: the prompt tokens (read from the positive sequence's "
                "forward), or the response tokens of the model's own greedy continuation (our choices)."})
    anchor_refresh_steps: int = field(default=10, metadata={
        "help": "WPN with --anchor generation: steps between regenerating the continuations."})
    similarity: Literal["cosine", "dot"] = field(default="cosine", metadata={"help": "WPN: similarity in the N-pair loss."})
    temperature: float = field(default=0.1, metadata={"help": "WPN: temperature tau of the N-pair loss."})
    global_negatives: bool = field(default=True, metadata={
        "help": "WPN: use the harmful responses of every example on every rank as negatives (gathered)."})
    npair_weight: float = field(default=1.0, metadata={
        "help": "WPN: weight of the N-pair term (0 leaves the other terms alone: what the contrastive term adds "
                "is the difference; the term is still computed and logged)."})
    positive_lm_weight: Optional[float] = field(default=1.0, metadata={
        "help": "WPN: weight of the token cross-entropy of the harmless response given the prompt, added to the "
                "N-pair loss (our choice, not the paper's: the N-pair term alone collapses the toy model; "
                "0 with --retain_weight 0 --retention_weight 0 --recovery_cuts 0 --prompt_noise 0 --frozen_side none "
                "--tamper_weight 0 is the paper-literal N-pair loss)."})
    retain_weight: Optional[float] = field(default=None, metadata={
        "help": "WPN: weight of a retain term on normal data (--normal_data), added to the N-pair loss (our "
                "choice). Default: 1 when there is normal data (the toy world has its own), else 0."})
    retain_loss: Literal["ce", "kl"] = field(default="ce", metadata={
        "help": "WPN: retain term: cross-entropy of the normal responses, or KL from the frozen original model "
                "(on the toy world, with --temperature 0.5, KL meets every WPN target on seeds 0-9 read "
                "strictly, measured after the defaults were set; README, the efficacy table)."})
    recovery_cuts: Optional[int] = field(default=None, metadata={
        "help": "WPN: anchors inside the harmful response (our choice, not the paper's): at this many cuts k of "
                "each example's first harmful response, a second N-pair term whose anchor is the pooled "
                "[prompt; harmful[:k]], positive the harmless response written after that prefix, and negatives "
                "the harmful continuations harmful[k:], with the cross-entropy of that harmless continuation. "
                "Default: 3 when there is normal data (the toy world has its own), else 0: without a retain term "
                "the cuts cost the toy model nearly all its QA accuracy (README, the efficacy table)."})
    recovery_depths: Literal["even", "random"] = field(default="random", metadata={
        "help": "WPN with --recovery_cuts: where the cuts fall: evenly spaced in the harmful response, or drawn "
                "afresh every step, uniform over every depth (our choice)."})
    recovery_weight: float = field(default=0.0, metadata={
        "help": "WPN with --recovery_cuts: weight of the recovery N-pair term (our choice). Default 0, off: on the "
                "toy world it gave back what the frozen candidates hold off (relearned @5 61-100%% on seeds 0-4, "
                "against 0-21%% without it; README, the efficacy table); the cuts' LM term (--recovery_lm_weight) "
                "stays."})
    recovery_lm_weight: float = field(default=1.0, metadata={
        "help": "WPN with --recovery_cuts: weight of the token cross-entropy of the harmless response written "
                "after each harmful prefix (safety-recovery augmentation; our choice)."})
    frozen_side: Literal["none", "candidates", "anchor"] = field(default="candidates", metadata={
        "help": "WPN: which side of the N-pair terms is pooled from the frozen original model instead of the "
                "trained one (our choice): 'candidates' (the default: positives and negatives are fixed targets "
                "the anchor moves between; on the toy world it holds off 5 steps of the relearning attack on 4 of "
                "5 seeds, 'none' on none of them: README, the efficacy table), 'anchor' (the prompt's "
                "representation is fixed and the responses move), or 'none' (both sides trained, the paper's "
                "form). Any but 'none' needs the frozen model (a second engine)."})
    retention_weight: Optional[float] = field(default=None, metadata={
        "help": "WPN: weight of a representation-retention term on normal data (--normal_data; our choice): the "
                "squared distance between the trained and the frozen original model's states of "
                "--representation_layer at every token of the normal rows, relative to the frozen states' "
                "squared norm. A regulariser against collapse that is not an LM term; it needs the frozen model "
                "(a second engine). Default: 10 on the toy world, 4 with your --normal_data, else 0."})
    prompt_noise: Optional[float] = field(default=None, metadata={
        "help": "WPN: prompt noise (our choice, not the paper's): every step, half the examples are trained on a "
                "disturbed copy of their prompt, each of its tokens replaced with this probability, or else "
                "followed by a token inserted with half of it, drawn from the training data's own tokens "
                "(--prompt_noise_pool; wpn_dist.app.prompt_noise). On the toy world it carries the harmless answer to unseen phrasings "
                "and appended words; measured on the toy world only. 0: prompts as written. Default: 0.4 when "
                "there is normal data (the toy world has its own), else 0: without a retain term it makes the "
                "toy model refuse the normal questions too (README, the efficacy table)."})
    prompt_noise_pool: Optional[Literal["data", "prompts"]] = field(default=None, metadata={
        "help": "WPN with --prompt_noise: the tokens the noise draws: every token of the training rows, prompts and "
                "responses (data), or of the prompts only (prompts). Our choice, from the toy benchmark: "
                "default prompts on the toy world (beside --tamper_prompt_noise it is what meets every target "
                "on seed 7), else data (at the earlier toy defaults, which the defaults for your own data "
                "follow, the data pool kept more QA on seed 0; README, the efficacy table)."})
    prompt_noise_wrap: Optional[float] = field(default=None, metadata={
        "help": "WPN with --prompt_noise: the probability that a disturbed prompt is also wrapped, a run of the "
                "pool's tokens put before or after its text (our choice; wpn_dist.app.prompt_noise). 0: no wrap. "
                "Default: 0.5 on the toy world, else 0 (measured on the toy world only)."})
    forget_weight: float = field(default=0.0, metadata={
        "help": "WPN: weight of a forget term (our choice; 0, the default: off): gradient ascent on the harmful "
                "responses' tokens, each token's NLL capped at --forget_cap so that a token already that unlikely "
                "is pushed no further. On the toy world it slows the relearning attack at a cost in QA on some "
                "seeds (README, the efficacy table)."})
    forget_cap: float = field(default=10.0, metadata={
        "help": "WPN with --forget_weight: the NLL (nats) past which a harmful token is no longer pushed down."})
    tamper_weight: Optional[float] = field(default=None, metadata={
        "help": "WPN: weight of the tamper-resistance term (our choice, after TAR): every step each rank "
                "fine-tunes a copy of the weights on the harmful pairs of half the groups of examples "
                "(--tamper_steps, --tamper_lr) and adds the gradient of the other half's harmless cross-entropy "
                "at the attacked weights (wpn_dist.app.tamper). Default: 1 on the toy world, where it holds off "
                "the benchmark's 20-step relearning attack on seeds 0-9, not 50 steps, at about 4 times the "
                "training time (README, the efficacy table); else 0, off: it keeps a full copy of the model with "
                "its AdamW state on every rank (about 16 bytes a parameter)."})
    tamper_steps: int = field(default=20, metadata={
        "help": "WPN with --tamper_weight: the simulated attack runs a number of steps drawn from 1 to this."})
    tamper_lr: Optional[float] = field(default=None, metadata={
        "help": "WPN with --tamper_weight: the simulated attack's AdamW lr. Default: 1e-3 on the toy world (twice the "
                "benchmark's relearning attack), else 5e-4."})
    tamper_batch_size: int = field(default=16, metadata={
        "help": "WPN with --tamper_weight: rows per step of the simulated attack and of its target loss."})
    tamper_prompt_noise: bool = field(default=True, metadata={
        "help": "WPN with --tamper_weight and --prompt_noise: the simulated attack's target rows (harmless answers "
                "at the attacked weights) get the step's disturbed prompts as well, not only the prompts as "
                "written (our choice; --no_tamper_prompt_noise: as written). On the toy world, with the prompts' "
                "noise pool, it is what meets every WPN target on seeds 0-9 (README, the efficacy table)."})
    representation_layer: int = field(default=-1, metadata={
        "help": "WPN: which hidden state the N-pair terms pool (an index into output_hidden_states: -1 the last, "
                "which the LM head reads; a middle layer is our choice)."})

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.anchor_refresh_steps < 1:
            raise ValueError(f"--anchor_refresh_steps must be at least 1, got {self.anchor_refresh_steps}")
        if self.recovery_cuts is not None and self.recovery_cuts < 0:
            raise ValueError(f"--recovery_cuts must be >= 0, got {self.recovery_cuts}")
        if self.tamper_steps < 1 or self.tamper_batch_size < 1:
            raise ValueError(f"--tamper_steps and --tamper_batch_size must be at least 1, got {self.tamper_steps} "
                             f"and {self.tamper_batch_size}")
        if self.tamper_lr is not None and self.tamper_lr <= 0:
            raise ValueError(f"--tamper_lr must be > 0, got {self.tamper_lr}")
        if self.forget_cap <= 0:
            raise ValueError(f"--forget_cap must be > 0, got {self.forget_cap}")
        if self.prompt_noise is not None and not 0 <= self.prompt_noise <= 1:
            raise ValueError(f"--prompt_noise must be within [0, 1], got {self.prompt_noise}")
        if self.prompt_noise_wrap is not None and not 0 <= self.prompt_noise_wrap <= 1:
            raise ValueError(f"--prompt_noise_wrap must be within [0, 1], got {self.prompt_noise_wrap}")
        for name in ("npair_weight", "positive_lm_weight", "retain_weight", "recovery_weight", "recovery_lm_weight",
                     "retention_weight", "forget_weight", "tamper_weight"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")

    @staticmethod
    def inactive(values: dict) -> set:
        """The options that have no effect on a run given the others (``values``: the resolved options by
        name), so that a finished run can stand for one that only sets them otherwise (the toy benchmark)."""
        out = set()
        if not values.get("tamper_weight"):
            out |= {"tamper_steps", "tamper_lr", "tamper_batch_size", "tamper_prompt_noise"}
        if not values.get("prompt_noise"):
            out |= {"prompt_noise_pool", "prompt_noise_wrap", "tamper_prompt_noise"}
        if not values.get("recovery_cuts"):
            out |= {"recovery_depths", "recovery_weight", "recovery_lm_weight"}
        if not values.get("forget_weight"):
            out.add("forget_cap")
        if values.get("anchor") != "generation":
            out.add("anchor_refresh_steps")
        return out

    def resolve_defaults(self, toy_world: bool, has_normal_data: bool = False) -> list:
        """The defaults come from the toy benchmark's ablation (README, "The efficacy table"); the retain,
        retention and recovery terms need normal data. Returns the notes the run should print."""
        normal = toy_world or has_normal_data
        notes = []
        if self.recovery_cuts is None and not normal:
            notes.append("wpn_dist: no --normal_data, so WPN runs without its retain, retention and recovery "
                         "terms and without prompt noise (on the toy world the recovery cuts or the noise without a "
                         "retain term make the model refuse everything): answers pre-started harmfully and unseen "
                         "phrasings are not unlearned as well. Give --normal_data to have them.")
        if self.positive_lm_weight is None:
            self.positive_lm_weight = 1.0
        if self.retain_weight is None:
            self.retain_weight = 1.0 if normal else 0.0
        if self.recovery_cuts is None:
            self.recovery_cuts = 3 if normal else 0
        if self.retention_weight is None:
            self.retention_weight = 10.0 if toy_world else 4.0 if normal else 0.0
        if self.prompt_noise is None:
            self.prompt_noise = 0.4 if normal else 0.0
        # The tamper term, the wrap and the prompts' pool were tuned on the toy world, where they are on by
        # default; on a real model the tamper term's whole-model copy costs memory and about 4 times the step
        # time, and the data pool is the earlier defaults' (README, "Defaults").
        if self.prompt_noise_wrap is None:
            self.prompt_noise_wrap = 0.5 if toy_world else 0.0
        if self.prompt_noise_pool is None:
            self.prompt_noise_pool = "prompts" if toy_world else "data"
        if self.tamper_weight is None:
            self.tamper_weight = 1.0 if toy_world else 0.0
        if self.tamper_lr is None:
            self.tamper_lr = 1e-3 if toy_world else 5e-4
        return notes


@register
class WPN(Method):
    """N-pair loss; the anchor is pooled over the prompt tokens of the positive rows (by causality the
    same in every sequence that starts with the prompt: no extra forward), or with ``--anchor
    generation`` over the response tokens of the model's own continuation (extra rows)."""
    name = "wpn"
    Options = WPNOptions

    def row_groups(self) -> tuple:
        groups = ("anchor",) if self.options.anchor == "generation" else ()
        groups += ("recovery",) if (self.options.recovery_cuts or 0) > 0 else ()
        normal = (self.options.retain_weight or 0) > 0 or (self.options.retention_weight or 0) > 0
        return groups + (("normal",) if normal else ())

    def batch_options(self) -> dict:
        return {"recovery_cuts": self.options.recovery_cuts or 0, "recovery_depths": self.options.recovery_depths,
                "prompt_noise": self.options.prompt_noise or 0.0,
                "prompt_noise_pool": self.options.prompt_noise_pool or "data",  # unresolved options: the data pool
                "prompt_noise_wrap": self.options.prompt_noise_wrap or 0.0}

    def needs_reference(self) -> bool:
        o = self.options
        return ((o.retain_weight or 0) > 0 and o.retain_loss == "kl") or o.frozen_side != "none" or \
            (o.retention_weight or 0) > 0

    def tamper_settings(self):
        o = self.options
        if not o.tamper_weight:  # 0, or not resolved yet
            return None
        return TamperSettings(o.tamper_weight, o.tamper_steps, o.tamper_lr, o.tamper_batch_size, o.tamper_prompt_noise)

    def on_step_start(self, run) -> None:
        if self.options.anchor != "generation":
            return
        if run.step == run.first_step or (run.step - 1) % self.options.anchor_refresh_steps == 0:
            examples = run.examples()
            texts = run.generate([e.prompt for e in examples])
            run.set_anchors({e.example_id: text for e, text in zip(examples, texts)})

    def loss_terms(self, model, batch: dict, reference=None) -> dict:
        o = self.options
        layout = batch["layout"]
        lm_weight, retain_weight = o.positive_lm_weight or 0.0, o.retain_weight or 0.0
        positives = positive_rows(batch)
        cuts = o.recovery_cuts or 0
        recovery_lm = cuts > 0 and o.recovery_lm_weight > 0
        # The token terms' positions, known before the forward: only they go through the LM head.
        tokens = {}
        if lm_weight > 0:
            tokens["positive"] = layout.targets(positives)
        if recovery_lm:
            tokens["recovery"] = layout.targets(batch["recovery_rows"])
        if retain_weight > 0:
            rows = batch["normal_rows"]
            tokens["normal"] = layout.every_token(rows) if o.retain_loss == "kl" else layout.targets(rows)
        harmful = harmful_rows(batch)
        if o.forget_weight > 0:
            tokens["harmful"] = layout.targets(harmful)
        out = forward(model, batch, hidden_states=True, logits_for=tokens.values())
        hidden = out.hidden(o.representation_layer)
        # The states each side of the N-pair terms is pooled from: the trained model's, or with
        # --frozen_side the frozen original model's for that side (constants: no gradient).
        frozen = reference_states(reference, batch).hidden(o.representation_layer).float() \
            if o.frozen_side != "none" else None
        sides = {"anchor": frozen if o.frozen_side == "anchor" else hidden,
                 "candidates": frozen if o.frozen_side == "candidates" else hidden}
        responses = pool_tokens(sides["candidates"], layout.span(all_rows(batch)), o.pooling)  # [S, D] fp32
        if o.anchor == "generation":
            anchor = pool_tokens(sides["anchor"], layout.span(batch["anchor_rows"]), o.pooling)
        else:
            anchor = pool_tokens(sides["anchor"], layout.prompt(positives), o.pooling)
        negatives = responses[batch["negative_rows"]]  # [B, K, D]; masked slots point at row 0
        # With the step plan's dedup mask and shapes (gather_shape), the loss issues one gather, no sync.
        terms = {"loss/npair": npair_loss(anchor, responses[positives], negatives,
                                          batch.get("negative_first", batch["negative_mask"]),
                                          temperature=o.temperature, similarity=o.similarity,
                                          global_negatives=o.global_negatives, example_ids=batch["example_ids"],
                                          anchor_weights=row_weights(batch, positives),
                                          normalizer=normalizer(batch, "anchors"),
                                          gather_shape=batch.get("gather_shape"))}
        weights = {"npair": o.npair_weight}
        if cuts > 0:
            terms["loss/recovery_npair"] = self._recovery_npair(sides, responses, batch)
            weights["recovery_npair"] = o.recovery_weight
            if recovery_lm:
                terms["loss/recovery_lm"] = cross_entropy(out, batch, batch["recovery_rows"], tokens["recovery"],
                                                          "tokens/recovery")
                weights["recovery_lm"] = o.recovery_lm_weight
        if lm_weight > 0:
            terms["loss/positive_lm"] = cross_entropy(out, batch, positives, tokens["positive"], "tokens/positive")
            weights["positive_lm"] = lm_weight
        if retain_weight > 0:
            rows = batch["normal_rows"]
            if o.retain_loss == "kl":
                terms["loss/retain"] = kl(out, batch, rows, tokens["normal"], reference, "attended/normal")
            else:
                terms["loss/retain"] = cross_entropy(out, batch, rows, tokens["normal"], "tokens/normal")
            weights["retain"] = retain_weight
        if o.forget_weight > 0:
            terms["loss/forget"] = self._forget(out, batch, harmful, tokens["harmful"])
            weights["forget"] = o.forget_weight
        if (o.retention_weight or 0) > 0:
            terms["loss/retention"] = self._retention(hidden, batch, reference, frozen)
            weights["retention"] = o.retention_weight
        return total(terms, weights)

    def _forget(self, out, batch: dict, harmful, tokens):
        """Minus the mean NLL of the harmful responses' tokens, each capped at --forget_cap: the capped
        tokens give no gradient, so the ascent stops where a token is already that unlikely instead of
        driving the logits without bound."""
        nll = token_nll_at(out.logits, out.index(tokens), tokens.labels).clamp_max(self.options.forget_cap)
        return -token_mean(nll, batch, harmful, tokens, "tokens/negative")

    def _retention(self, hidden, batch: dict, reference, frozen_batch=None):
        """Mean over the normal rows' tokens of |h - h_frozen|^2 / |h_frozen|^2 at the representation
        layer. The frozen states are ``frozen_batch``'s (the reference's states of the whole batch) when
        a frozen side already computed them, else from a forward of the reference over those rows only."""
        layout, rows = batch["layout"], batch["normal_rows"]
        tokens = layout.every_token(rows)
        if frozen_batch is not None:
            frozen = frozen_batch[tokens.flat]
        else:
            sub = layout.select(rows)
            frozen = reference_states(reference, {"layout": sub}).hidden(self.options.representation_layer).float()
            frozen = frozen[sub.every_token(range(len(sub.sequences))).flat]  # row-major, as ``tokens``
        moved = hidden[tokens.flat].float()
        per_token = (moved - frozen).pow(2).sum(-1) / frozen.pow(2).sum(-1).clamp_min(1e-6)
        return token_mean(per_token, batch, rows, tokens, "attended/normal")

    def _recovery_npair(self, sides: dict, responses, batch: dict):
        """The N-pair term at cuts inside the harmful responses: anchor = the pooled prefix
        [prompt; harmful[:k]] of a recovery row (by causality the same states as in the harmful row),
        positive = its harmless continuation, negative = the harmful row's own continuation harmful[k:]."""
        o = self.options
        layout = batch["layout"]
        rows = batch["recovery_rows"]
        cut = layout.prompt_lengths[rows]  # a recovery row's "prompt" is its harmful prefix
        anchor = pool_tokens(sides["anchor"], layout.span(rows, start=0, stop=cut), o.pooling)
        harmful = batch["negative_rows"][batch["recovery_example"], 0]
        negatives = pool_tokens(sides["candidates"], layout.span(harmful, start=cut), o.pooling)[:, None, :]
        # One id per (example, cut): copies of an example count once, its cuts are distinct anchors.
        ids = batch["example_ids"][batch["recovery_example"]] * max(o.recovery_cuts, 1) + \
            torch.arange(rows.shape[0]) % max(o.recovery_cuts, 1)
        return npair_loss(anchor, responses[rows], negatives, batch.get("recovery_first"), temperature=o.temperature,
                          similarity=o.similarity, global_negatives=o.global_negatives, example_ids=ids,
                          anchor_weights=row_weights(batch, rows), normalizer=normalizer(batch, "rows/recovery"),
                          gather_shape=batch.get("recovery_gather_shape"))
