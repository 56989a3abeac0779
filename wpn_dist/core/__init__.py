"""The library: what you import into your own training loop.

- ``pooling.pool``: position-weighted / mean / last pooling of hidden states over a span;
- ``contrastive.npair_loss``: WPN's N-pair loss, which owns its gather of negatives across ranks;
- ``token_losses``: response cross-entropy and KL to a frozen reference;
- ``methods``: the objectives (wpn, sft, ga, icu, npo, simnpo, rmu, rr, lm), one module each, found by name in a registry.

Nothing here imports the application (``wpn_dist.app``) or the benchmarks (``wpn_dist.bench``).
"""
