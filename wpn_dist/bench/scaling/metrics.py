"""What the numbers of a scaling-study row mean: step-time statistics, FLOPs per step, utilisation
against a table of peak FLOP/s, and a description of the machine and the library versions.

FLOPs (per token of a row of T tokens, model of N parameters, L layers, hidden size d):

- training (forward + backward): ``6N + 12*L*d*T`` (``models.flops_per_token``; Kaplan et al. 2020,
  "Scaling Laws for Neural Language Models", section 2.1; the same count as PaLM's MFU, Chowdhery
  et al. 2022, appendix B). N counts every parameter, embeddings included (the tied LM head's matmul).
- forward only (the frozen reference model of ga and icu): a third of it, ``2N + 4*L*d*T``.
- model FLOPs per step = trained tokens x training FLOPs + reference tokens x forward FLOPs.
- hardware FLOPs per step = model FLOPs + trained tokens x forward FLOPs when activation checkpointing
  recomputes the forward in backward (``8N + 16*L*d*T`` per trained token).
- MFU = model FLOP/s per GPU / peak FLOP/s per GPU; HFU the same with hardware FLOPs.

Peak FLOP/s are dense bf16 tensor-core figures from the vendors' data sheets; no peak is claimed for
fp32 runs or for CPUs, so MFU and HFU are None there.
"""
import os
import platform
import statistics

# name fragment (lower case) -> dense bf16 peak FLOP/s per GPU; the first match wins.
PEAK_BF16_FLOPS = (
    ("h200", 989e12),         # H200 SXM: same compute as H100 SXM
    ("h100 pcie", 756e12),
    ("h100", 989e12),         # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("a100", 312e12),
)


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Peak FLOP/s per device for this precision, or None where none is claimed (CPU, fp32, unknown GPU)."""
    if not device_name or precision != "bf16":
        return None
    name = device_name.lower()
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment in name:
            return flops
    return None


def step_time_stats(times: list) -> dict:
    """Median and spread (quartiles, min, max) of the timed steps, in seconds."""
    if not times:
        return {}
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"step_time_median_s": statistics.median(ordered), "step_time_p25_s": q1, "step_time_p75_s": q3,
            "step_time_min_s": ordered[0], "step_time_max_s": ordered[-1], "steps_timed": len(ordered)}


def model_facts(model_name: str) -> dict:
    """Size of a spec (exact parameter count of the random-init architecture)."""
    from transformers.utils import logging as hf_logging
    from ...app.models import MODEL_SPECS, count_parameters
    spec = MODEL_SPECS[model_name]
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the meta build's config has no tokenizer ids: its warnings are noise
    try:
        num_params = count_parameters(spec)
    finally:
        hf_logging.set_verbosity(level)
    return {"num_params": num_params, "num_layers": spec.num_layers, "hidden_size": spec.hidden_size,
            "vocab_size": spec.vocab_size}


def flops_columns(row: dict) -> dict:
    """FLOPs per step, achieved TFLOP/s per GPU, MFU and HFU of a measured row (None where unknown)."""
    from ...app.models import flops_per_token
    out = dict.fromkeys(("model_flops_per_step", "hardware_flops_per_step", "model_tflops_per_gpu",
                         "hardware_tflops_per_gpu", "peak_tflops_per_gpu", "mfu", "hfu"))
    needed = ("num_params", "num_layers", "hidden_size", "seq_len", "tokens_per_step", "step_time_median_s")
    if any(row.get(k) is None for k in needed):
        return out
    train = flops_per_token(row["num_params"], row["num_layers"], row["hidden_size"], row["seq_len"])
    forward = train / 3.0
    model = row["tokens_per_step"] * train + (row.get("reference_tokens_per_step") or 0) * forward
    hardware = model + (row["tokens_per_step"] * forward if row.get("activation_checkpointing") else 0.0)
    per_gpu_seconds = row["step_time_median_s"] * row["world_size"]
    out.update(model_flops_per_step=model, hardware_flops_per_step=hardware,
               model_tflops_per_gpu=model / per_gpu_seconds / 1e12,
               hardware_tflops_per_gpu=hardware / per_gpu_seconds / 1e12)
    peak = peak_flops(row.get("device_name") if row.get("device_kind") == "cuda" else None, row["precision"])
    if peak:
        out.update(peak_tflops_per_gpu=peak / 1e12, mfu=model / per_gpu_seconds / peak,
                   hfu=hardware / per_gpu_seconds / peak)
    return out


def cpu_model() -> str:
    from ...app.versions import cpu_model as _cpu_model
    return _cpu_model()


def _gpu_from_nvidia_smi() -> dict:
    """GPU 0's name and memory without touching CUDA in this process (no context is created)."""
    import subprocess
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.splitlines()
        name, mib = [x.strip() for x in out[0].split(",")]
        return {"device_name": name, "device_memory_gib": float(mib) / 1024}
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return {"device_name": None, "device_memory_gib": None}


def machine(on_gpu: bool, query_cuda: bool = True) -> dict:
    """The hardware and the library versions, for a row. ``query_cuda=False`` (the sweep's own process)
    asks nvidia-smi instead of CUDA, so that the process holds no GPU memory while workers run."""
    import torch
    from ...app.versions import library_versions
    versions = library_versions()
    info = {"device_kind": "cuda" if on_gpu else "cpu", "host": platform.node(), "cpu_model": versions["cpu_model"],
            "cpu_cores": os.cpu_count(), **{k: versions[k] for k in ("python", "torch", "deepspeed", "transformers", "cuda")}}
    if on_gpu and query_cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=torch.cuda.get_device_name(0), device_memory_gib=props.total_memory / 2**30)
    elif on_gpu:
        info.update(_gpu_from_nvidia_smi())
    else:
        info.update(device_name=info["cpu_model"], device_memory_gib=None)
    return info
