"""Building and loading a model and tokenizer by spec name (wpn_dist/app/model_specs.py), local path
or hub id.

A spec's architecture builds a model with random weights (tests, benchmarks), and gives its size and
FLOPs without downloading it. ``pretrained`` loading goes through ``from_pretrained`` on a local
directory: a hub id's files are fetched into the cache first (wpn_dist/app/hub.py).
"""
import os

import torch

from .model_specs import MODEL_SPECS, ModelSpec  # noqa: F401 (the table lives there; hub.py reads it too)


def is_local_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def check_model_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a spec name, a local model directory or a hub id
    ("org/name", fetched by wpn_dist.app.hub)."""
    from .hub import is_hub_id
    if name in MODEL_SPECS or is_local_model_dir(name) or is_hub_id(name):
        return
    hint = " (a directory, but it has no config.json)" if os.path.isdir(name) else ""
    raise ValueError(f"--model {name!r} is neither a known model ({', '.join(MODEL_SPECS)}), a "
                     f"local model directory{hint}, nor a hub id (org/name)")


def build_config(spec: ModelSpec, vocab_size: int | None = None, tokenizer=None):
    """The Hugging Face config of ``spec`` (random init), with the tokenizer's special ids."""
    from transformers import GPTJConfig, GPTNeoConfig, GPTNeoXConfig, OPTConfig
    vocab = vocab_size or spec.vocab_size
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    common = dict(vocab_size=vocab, **ids)
    if spec.family == "opt":
        return OPTConfig(num_hidden_layers=spec.num_layers, hidden_size=spec.hidden_size,
                         num_attention_heads=spec.num_heads, ffn_dim=spec.ffn_size,
                         word_embed_proj_dim=spec.hidden_size, max_position_embeddings=spec.max_positions,
                         dropout=0.0, attention_dropout=0.0, **common)
    if spec.family == "gpt_neo":
        return GPTNeoConfig(num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                            num_heads=spec.num_heads, intermediate_size=spec.ffn_size,
                            attention_types=[[["global", "local"], spec.num_layers // 2]],
                            max_position_embeddings=spec.max_positions, window_size=256,
                            embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, **common)
    if spec.family == "gptj":
        return GPTJConfig(n_layer=spec.num_layers, n_embd=spec.hidden_size, n_head=spec.num_heads,
                          n_inner=spec.ffn_size, n_positions=spec.max_positions, rotary_dim=64,
                          **common)
    if spec.family == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=spec.num_layers, hidden_size=spec.hidden_size,
                             num_attention_heads=spec.num_heads, intermediate_size=spec.ffn_size,
                             max_position_embeddings=spec.max_positions, **common)
    raise ValueError(f"unknown model family {spec.family!r}")


def meta_model(name: str):
    """The architecture of a spec name, a local model directory or a hub id, built on the meta device:
    sizes without allocating weights (a hub id's config.json is fetched into the cache, or read from it)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from .hub import fetch_all, model_fetch
    check_model_name(name)
    if name in MODEL_SPECS:
        config = build_config(MODEL_SPECS[name])
    else:
        job = model_fetch(name, init="random")  # the config only
        config = AutoConfig.from_pretrained(fetch_all([job])[job] if job is not None else name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def context_length(model: str) -> int:
    """Positions the model can attend over: a spec's, or a model directory's config.json (no weights
    are read)."""
    if model in MODEL_SPECS:
        return MODEL_SPECS[model].max_positions
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return 2048


def count_parameters(spec: ModelSpec) -> int:
    """Exact parameter count of a spec (a tied weight counted once)."""
    return sum(p.numel() for p in meta_model(spec.name).parameters())


def flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with the weights plus 12*L*d*T for attention
    scores and values (Kaplan et al. 2020, as in nanoGPT's estimate_mfu and PaLM's MFU)."""
    return 6.0 * num_params + 12.0 * num_layers * hidden_size * seq_len


def byte_level_tokenizer():
    """A byte-level BPE tokenizer without merges (256 byte tokens + specials), built in-process:
    the tokenizer of random-init models that have none of their own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def load_tokenizer(model: str, tokenizer: str | None = None):
    """The tokenizer given explicitly, else the model directory's, else the hub id's; random-init
    tiny specs fall back to the byte-level tokenizer."""
    from transformers import AutoTokenizer
    source = tokenizer or (model if is_local_model_dir(model) else None)
    if source is None and model in MODEL_SPECS and MODEL_SPECS[model].hub_id is not None:
        source = MODEL_SPECS[model].hub_id
    if source is None:
        tok = byte_level_tokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(model: str, tokenizer, init: str = "pretrained", dtype: torch.dtype = torch.float32,
               seed: int = 0):
    """Build or load the causal LM.

    ``init="pretrained"`` loads weights from a local directory or the spec's hub id. Under ZeRO-3
    the caller keeps a ``transformers.integrations.HfDeepSpeedConfig`` alive first, so that
    ``from_pretrained`` partitions the weights across ranks as it loads them.

    ``init="random"`` builds the spec's architecture with fresh weights, in host memory on every rank
    (identically: same seed), and ``deepspeed.initialize`` partitions it afterwards. Building inside
    ``deepspeed.zero.Init`` is avoided on purpose: with transformers 5 it leaves weights
    uninitialised or fails on OPT's padding row.
    """
    from transformers import AutoModelForCausalLM
    if init == "pretrained":
        source = model if is_local_model_dir(model) else (MODEL_SPECS[model].hub_id if model in MODEL_SPECS else model)
        if source is None:
            raise ValueError(f"--model {model} has no pretrained weights; use --model_init random")
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if init != "random":
        raise ValueError(f"--model_init must be 'pretrained' or 'random', got {init!r}")
    if model in MODEL_SPECS:
        config = build_config(MODEL_SPECS[model], vocab_size=len(tokenizer), tokenizer=tokenizer)
    else:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(model)
    # Random init reads the global RNG: seed it so that every rank builds the same weights.
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return net
