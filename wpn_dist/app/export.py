"""Export a DeepSpeed engine's model as a plain Hugging Face directory (safetensors, config.json,
tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` loads without DeepSpeed.

``export_hf`` is a collective: under ZeRO-3 each rank holds only a slice of every weight, so every
rank must call it (in the same place) for rank 0 to gather the whole model. Only rank 0 writes.
"""
import copy
import os
import shutil
import uuid

import torch

from . import distributed


def _full_state_dict(engine):
    """The full (unpartitioned) state dict on rank 0, None on the other ranks (collective under ZeRO-3).

    Tied weights (OPT's lm_head.weight = model.decoder.embed_tokens.weight) come out as the same
    tensor object under two keys, which save_pretrained relies on to drop the alias.
    """
    if engine.zero_optimization_partition_weights():
        # Gathers one module at a time onto rank 0 (every rank must call it). It returns the
        # module's weights in the training dtype (fp32, or bf16 when training in bf16, in which case
        # the fp32 master copy in the optimizer is not what gets exported), despite its name.
        return engine._zero3_consolidated_16bit_state_dict()
    # ZeRO 0-2: every rank already holds the whole module; rank 0's copy is the one to write.
    return engine.module.state_dict() if distributed.is_main() else None


def _cast(state_dict: dict, dtype: torch.dtype) -> dict:
    """Floating tensors cast to ``dtype``, one at a time (the source entry dropped as it goes, to keep
    rank 0's peak host memory near one copy), casting shared tensors once so they stay shared."""
    done, out = {}, {}
    for key in list(state_dict):
        tensor = state_dict.pop(key)
        if id(tensor) not in done:
            done[id(tensor)] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        out[key] = done[id(tensor)]
    return out


def _write(module, tokenizer, state_dict: dict, dtype: torch.dtype, out_dir: str) -> None:
    """Rank 0: write into a fresh directory beside ``out_dir``, then rename it into place, so that an
    interrupted export never leaves a half-written ``out_dir`` (the old one stays until the rename)."""
    out_dir = os.path.abspath(out_dir)
    parent, base, tag = os.path.dirname(out_dir), os.path.basename(out_dir), uuid.uuid4().hex[:8]
    os.makedirs(parent, exist_ok=True)
    # Beside out_dir (same filesystem: the rename is atomic); made with makedirs, not mkdtemp, so that
    # the export gets the umask's permissions rather than mkdtemp's owner-only 0700.
    tmp = os.path.join(parent, f".{base}.tmp-{tag}")
    os.makedirs(tmp)
    try:
        # save_pretrained drops tied aliases (safetensors refuses shared storage), shards large
        # models, and writes config.json and generation_config.json. Given a state_dict it reads
        # no parameter data (only the dtype, and sets config.dtype/architectures on the live config),
        # so ZeRO-3's empty partitioned parameters do not matter.
        module.save_pretrained(tmp, state_dict=state_dict)
        # save_pretrained records the live module's dtype (the training dtype) in config.json;
        # record the dtype actually written instead, so from_pretrained(dtype="auto") matches.
        config = copy.deepcopy(module.config)
        config.dtype = dtype
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = None
        if os.path.exists(out_dir):
            # A directory cannot be renamed over a non-empty one: move the old export aside first
            # (a crash right here leaves it whole, under that name).
            old = os.path.join(parent, f".{base}.old-{tag}")
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_hf(engine, tokenizer, out_dir: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """Write ``engine``'s model (any ZeRO stage) to ``out_dir`` as a Hugging Face model directory.

    Collective: every rank must call it. Rank 0 gathers the full weights, casts them to ``dtype``
    (16-bit by default: half the size, and what inference loads; pass torch.float32 for an exact copy
    of fp32 training weights) and writes. Every rank returns only once the export is complete, or
    raises if rank 0 failed to write it. Returns ``out_dir``.
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"export dtype must be bfloat16, float16 or float32, got {dtype}")
    state_dict = _full_state_dict(engine)
    failure = None
    if distributed.is_main():
        try:
            _write(engine.module, tokenizer, _cast(state_dict, dtype), dtype, out_dir)
        except Exception as e:  # told to every rank below, so that none waits forever
            failure = e
    del state_dict
    # Also the barrier: no rank goes on (e.g. to read the export) before rank 0 has finished.
    error = distributed.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if error is not None:
        raise RuntimeError(f"export_hf to {out_dir} failed on rank 0: {error}") from failure
    return out_dir
