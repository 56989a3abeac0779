"""Attention over a packed batch (``packing.Layout`` with kind "packed"): each sequence's own tokens
attend to its shared start (read where it was computed) and to themselves, causally in logical
positions, so that the packed forward computes what the padded one computes, without the padding
and without encoding any prompt twice.

``install(model)`` teaches a model to read the active layout; ``active(layout)`` makes it active for
a forward and, under activation checkpointing, for the backward that recomputes it. With no layout
active the model's attention is what it was. Supported (``SUPPORTED_MODEL_TYPES``): OPT, GPT-J,
GPT-NeoX and Llama, which pick their attention through transformers' attention interface, and GPT-Neo
(global and local layers).

Each sequence is one ``scaled_dot_product_attention`` call over its own queries: attention costs
what the sequences need, not (packed length)^2. The price is a Python loop over sequences per
layer, small next to the layers' matrix products at real sizes.
"""
import contextlib
import sys

import torch
import torch.nn.functional as F

IMPLEMENTATION = "wpn_packed"
# Architectures whose packed forward is tested equal to each sequence run alone (tests/test_packing.py).
# Others (e.g. those that carry ALiBi biases in the attention mask) fall back to the padded layout.
SUPPORTED_MODEL_TYPES = ("opt", "gpt_neo", "gptj", "gpt_neox", "llama")
_active = None


@contextlib.contextmanager
def active(layout):
    """Route every installed model's attention through ``layout`` (None or a padded layout: no change)."""
    global _active
    previous = _active
    _active = layout if layout is not None and layout.kind == "packed" else None
    try:
        yield
    finally:
        _active = previous


def segment_attention(query, key, value, layout, scale: float | None, dropout: float = 0.0,
                      window: int | None = None) -> torch.Tensor:
    """``query/key/value`` [1, H, N, d] of the packed row -> attention output [1, H, N, d]."""
    if query.shape[0] != 1 or query.shape[2] != layout.num_executed_tokens():
        raise RuntimeError(f"packed attention: the active layout is one row of {layout.num_executed_tokens()} "
                           f"tokens, but this forward has {query.shape[0]} x {query.shape[2]}: run other "
                           f"forwards outside packed_attention.active()")
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key/value head serves several queries
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    outputs = []
    for start, count, keys, mask in layout.attention_plan(window):
        q = query[:, :, start:start + count]
        if keys is None:
            k, v = key[:, :, start:start + count], value[:, :, start:start + count]
            outputs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale))
        else:
            outputs.append(F.scaled_dot_product_attention(q, key[:, :, keys], value[:, :, keys], attn_mask=mask,
                                                          dropout_p=dropout, scale=scale))
    return torch.cat(outputs, dim=2)


def _interface_attention(fallback):
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        if _active is None:
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        window = getattr(module, "sliding_window", None)
        out = segment_attention(query, key, value, _active, scaling, dropout, window)
        return out.transpose(1, 2).contiguous(), None
    return attention


def _gpt_neo_attn(module, original):
    window = module.config_window if module.attention_type == "local" else None

    def _attn(query, key, value, attention_mask=None, *args, **kwargs):
        if _active is None:
            return original(query, key, value, attention_mask, *args, **kwargs)
        # As GPT-Neo's own: scores in fp32, no 1/sqrt(d) scaling.
        out = segment_attention(query.float(), key.float(), value.float(), _active, scale=1.0,
                                dropout=module.attn_dropout.p if module.training else 0.0, window=window)
        return out.to(value.dtype), None
    return _attn


def install(model) -> bool:
    """Make ``model`` (a transformers causal LM, before DeepSpeed wraps it) attend through the active
    layout. Returns False, changing nothing, for an architecture this module does not know."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if installed(model):
        return True
    if getattr(model.config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    gpt_neo = [m for m in model.modules() if type(m).__name__ == "GPTNeoSelfAttention"]
    if gpt_neo:
        for module in gpt_neo:
            module.config_window = model.config.window_size
            module._attn = _gpt_neo_attn(module, module._attn)
        model._wpn_packed_attention = True
        return True
    modeling = sys.modules.get(type(model).__module__)
    if modeling is None or not hasattr(modeling, "ALL_ATTENTION_FUNCTIONS"):
        return False
    current = model.config._attn_implementation or "eager"
    if current == "eager":
        fallback = getattr(modeling, "eager_attention_forward", None)
    else:
        fallback = ALL_ATTENTION_FUNCTIONS.get(current)
    if fallback is None or current not in ALL_MASK_ATTENTION_FUNCTIONS:
        return False
    name = f"{IMPLEMENTATION}_{current}"  # one registration per fallback
    AttentionInterface.register(name, _interface_attention(fallback))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.config._attn_implementation = name
    model._wpn_packed_attention = True
    for sub in model.modules():  # sub-configs (if any) follow the model's
        if hasattr(sub, "config") and sub.config is not model.config and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = name
    return True


def installed(model) -> bool:
    """Whether ``model`` (or the module a DeepSpeed engine wraps) reads the active layout."""
    return getattr(getattr(model, "module", model), "_wpn_packed_attention", False)
