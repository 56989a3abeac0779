"""Export a DeepSpeed engine's model as a plain Hugging Face directory (sharded safetensors, config.json,
tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` loads without DeepSpeed.

``export_hf`` is a collective: under ZeRO-3 each rank holds only a slice of every weight, so every
rank must call it (in the same place). The model is written shard by shard: every rank walks the same
shard plan (computed from the parameters' sizes, so no rank has to be told it), gathers a group of
weights at a time, and rank 0 copies them to host memory in the output dtype and writes each shard as
it fills. Rank 0 never holds more than about one shard plus one gathered group, and the other ranks
never wait longer than one shard's write: after each shard rank 0 tells every rank whether it failed,
so that a failure ends every rank with the same error instead of leaving them in the next gather.
"""
import contextlib
import copy
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass

import torch

from . import distributed

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"  # transformers' names
GATHER_BYTES = 1 << 30  # at most this much (in the output dtype) is gathered on every rank at once
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """Bytes of ``size``: a positive int, or a string such as "5GB" (5 * 10**9, as transformers reads
    it), "500MB", "2GiB" or "1.5GB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size > 0:
            return size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
        if match and (match.group(2) or "").upper() in _UNITS and float(match.group(1)) > 0:
            return max(1, int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]))
    raise ValueError(f"max_shard_size must be a positive number of bytes or a size like '5GB' or '500MB', got {size!r}")


def export_dtype(module, dtype=None) -> torch.dtype:
    """The dtype to write: ``dtype`` (a torch dtype or one of auto/bf16/fp16/fp32), or for None/"auto"
    the training dtype, i.e. that of the module's floating parameters (under ZeRO-3 the empty
    placeholders keep it)."""
    if isinstance(dtype, str):
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"export dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
        dtype = DTYPES.get(dtype)
    if dtype is None:
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    if dtype not in DTYPES.values():
        raise ValueError(f"export dtype must be bfloat16, float16 or float32, got {dtype}")
    return dtype


@dataclass
class _Entry:
    key: str               # the name written
    tensor: torch.Tensor   # the live parameter (a ZeRO-3 parameter: partitioned) or buffer
    dtype: torch.dtype     # as written: floating tensors in the export dtype, the others as they are
    nbytes: int            # as written


def _entries(module, dtype: torch.dtype) -> list:
    """What save_pretrained would write, in state-dict order, without reading any data.

    ``state_dict(keep_vars=True)`` gives the live parameters (so a tied weight is the same object under
    both of its names, and under ZeRO-3 each has its full size in ``ds_numel``). A tied weight is
    written once, under the name save_pretrained keeps: not the alias that the model declares tied
    (OPT and GPT-Neo keep the embedding, not lm_head.weight); from_pretrained ties it again.
    """
    ignored = set(getattr(module, "_keys_to_ignore_on_save", None) or ())
    tied_targets = set(getattr(module, "all_tied_weights_keys", None) or ())
    by_tensor = {}  # id -> (tensor, its names); insertion order is the state dict's
    for key, tensor in module.state_dict(keep_vars=True).items():
        if key not in ignored:
            by_tensor.setdefault(id(tensor), (tensor, []))[1].append(key)
    entries = []
    for tensor, keys in by_tensor.values():
        key = next((k for k in keys if k not in tied_targets), keys[0])
        out = dtype if tensor.is_floating_point() else tensor.dtype
        numel = getattr(tensor, "ds_numel", tensor.numel())
        entries.append(_Entry(key, tensor, out, numel * out.itemsize))
    return entries


def _plan(entries: list, limit: int) -> list:
    """Consecutive entries split greedily into lists of at most ``limit`` bytes (a single entry bigger
    than that is a list of its own), as transformers shards. Always at least one list."""
    lists, size = [[]], 0
    for entry in entries:
        if lists[-1] and size + entry.nbytes > limit:
            lists.append([])
            size = 0
        lists[-1].append(entry)
        size += entry.nbytes
    return lists


def _gathered(entries: list, partitioned: bool):
    """Under ZeRO-3, the entries' parameters gathered whole on every rank for the ``with`` block
    (collective; buffers are never partitioned). modifier_rank=None: read only, nothing to broadcast
    back on exit."""
    params = [e.tensor for e in entries if hasattr(e.tensor, "ds_id")]
    if not partitioned or not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _save_shard(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file
    save_file(tensors, path, metadata={"format": "pt"})  # the metadata save_pretrained writes


def _copy_to_host(group: list, tensors: dict) -> None:
    """Rank 0: the (gathered) entries copied to CPU in their output dtype, into ``tensors``. A copy,
    never a view: the gathered data is released when the gather ends."""
    for entry in group:
        tensors[entry.key] = entry.tensor.detach().to("cpu", dtype=entry.dtype, copy=True).contiguous()


class _Output:
    """Rank 0's side: a fresh directory beside ``out_dir`` that is filled and then renamed into place,
    so that an interrupted export never leaves a half-written ``out_dir`` (the old one stays until the
    rename)."""

    def __init__(self, out_dir: str):
        self.out_dir = os.path.abspath(out_dir)
        self.parent, self.base = os.path.dirname(self.out_dir), os.path.basename(self.out_dir)
        self.tag = uuid.uuid4().hex[:8]
        os.makedirs(self.parent, exist_ok=True)
        # Beside out_dir (same filesystem: the rename is atomic); made with makedirs, not mkdtemp, so
        # that the export gets the umask's permissions rather than mkdtemp's owner-only 0700.
        self.tmp = os.path.join(self.parent, f".{self.base}.tmp-{self.tag}")
        os.makedirs(self.tmp)

    def write_shard(self, name: str, tensors: dict) -> None:
        _save_shard(tensors, os.path.join(self.tmp, name))

    def finish(self, module, tokenizer, dtype: torch.dtype, weight_map: dict | None, total_size: int,
               total_parameters: int) -> None:
        """The index (several shards), config.json, generation_config.json and the tokenizer, then the
        rename into place."""
        if weight_map is not None:  # transformers' index format
            index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
                     "weight_map": weight_map}
            with open(os.path.join(self.tmp, INDEX_NAME), "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        # As save_pretrained writes it, on a copy (the live config stays the training run's), with the
        # dtype actually written, so that from_pretrained(dtype="auto") matches the files.
        config = copy.deepcopy(module.config)
        config.dtype = dtype
        config.architectures = [type(module).__name__]
        config.save_pretrained(self.tmp)
        if module.can_generate() and getattr(module, "generation_config", None) is not None:
            module.generation_config.save_pretrained(self.tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)
        old = None
        if os.path.exists(self.out_dir):
            # A directory cannot be renamed over a non-empty one: move the old export aside first
            # (a crash right here leaves it whole, under that name).
            old = os.path.join(self.parent, f".{self.base}.old-{self.tag}")
            os.rename(self.out_dir, old)
        os.rename(self.tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _attempt(fn, *args):
    """Run ``fn`` (rank 0's own work); return its exception instead of raising it, to be told to every
    rank by ``_agree``."""
    try:
        fn(*args)
    except Exception as e:
        return e
    return None


def _agree(error, out_dir: str, output) -> None:
    """Every rank learns whether rank 0's last piece of work failed (a broadcast, so also the point
    where the other ranks wait for it); if it did, rank 0 removes its temporary directory and every
    rank raises the same RuntimeError."""
    message = distributed.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if message is not None:
        if output is not None:
            output.abort()
        raise RuntimeError(f"export_hf to {out_dir} failed on rank 0: {message}") from error


def export_hf(engine, tokenizer, out_dir: str, dtype=None, max_shard_size="5GB") -> str:
    """Write ``engine``'s model (any ZeRO stage) to ``out_dir`` as a Hugging Face model directory.

    Collective: every rank must call it. ``dtype``: None or "auto" keeps the training dtype (that of
    the module's parameters: an exact copy of the weights); torch.bfloat16/float16/float32 (or
    "bf16"/"fp16"/"fp32") casts. ``max_shard_size`` (bytes, or "5GB", "500MB"): above it the weights
    are split into ``model-0000i-of-0000n.safetensors`` files and ``model.safetensors.index.json``.
    Every rank returns only once the export is complete and renamed into place, or raises
    RuntimeError if rank 0 failed to write it. Returns ``out_dir``.
    """
    module = engine.module
    dtype, limit = export_dtype(module, dtype), parse_size(max_shard_size)
    partitioned = engine.zero_optimization_partition_weights()  # ZeRO 0-2: every rank has the weights
    entries = _entries(module, dtype)
    shards = _plan(entries, limit)
    names = [WEIGHTS_NAME] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total_size = sum(e.nbytes for e in entries)
    main, started, output, bar = distributed.is_main(), time.time(), None, None
    error = None
    if main:
        try:
            output = _Output(out_dir)
        except Exception as e:
            error = e
    _agree(error, out_dir, output)
    try:
        if main:
            from tqdm import tqdm
            bar = tqdm(total=total_size, desc="export", unit="B", unit_scale=True, unit_divisor=1024,
                       file=sys.stderr, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
        weight_map = {}
        for name, shard in zip(names, shards):
            tensors = {}
            for group in _plan(shard, min(limit, GATHER_BYTES)):
                with _gathered(group, partitioned):  # every rank, in the same order
                    if main and error is None:
                        error = _attempt(_copy_to_host, group, tensors)
                if bar is not None:
                    bar.update(sum(e.nbytes for e in group))
            if main and error is None:
                error = _attempt(output.write_shard, name, tensors)
            del tensors
            _agree(error, out_dir, output)
            weight_map.update({e.key: name for e in shard})
        if main:
            total_parameters = sum(getattr(e.tensor, "ds_numel", e.tensor.numel()) for e in entries)
            error = _attempt(output.finish, module, tokenizer, dtype, weight_map if len(shards) > 1 else None,
                             total_size, total_parameters)
        _agree(error, out_dir, output)
    except BaseException:  # e.g. KeyboardInterrupt on rank 0: leave no temporary directory behind
        if output is not None:
            output.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    distributed.print0(f"wpn_dist: exported {out_dir}: {len(shards)} shard{'s' if len(shards) > 1 else ''}, "
                       f"{total_size / 2**30:.3g} GiB in {str(dtype).split('.')[-1]}, "
                       f"in {time.time() - started:.1f}s")
    return out_dir

