"""Memory plan for training a causal LM with DeepSpeed ZeRO-2/3: model states per GPU and per node,
and the largest micro-batch that fits the GPU memory left for activations.

    python -m wpn_dist.memory --model opt-66b --nodes 8 --gpus-per-node 8 --offload cpu

Model states (mixed-precision Adam, 16-bit weights) are counted exactly as DeepSpeed's estimators
count them, ``estimate_zero2_model_states_mem_needs`` (runtime/zero/stage_1_and_2.py) and
``estimate_zero3_model_states_mem_needs`` (runtime/zero/stage3.py), but split into parts, in bytes
per parameter:

    params  16-bit weights: 2, replicated under ZeRO-2, partitioned under ZeRO-3
    grads   ZeRO-2: 2 (16-bit) + 4 (fp32 copy), ZeRO-3: 4; partitioned
    optim   fp32 master weights 4 + Adam momentum 4 + variance 4 = 12; partitioned
    gather  ZeRO-3 only: 2+2 (16-bit weight and grad) of the largest module, gathered whole

Beside them, what wpn_dist's methods add (``--frozen_model``, ``--tamper_copy``):

    frozen  the frozen original model, a second engine without optimizer (WPN's default: its N-pair
            candidates and retention term; the KL baselines): 2, partitioned like the weights under
            ZeRO-3 (and offloaded with them), whole on every GPU under ZeRO-2 (a stage-0 engine)
    tamper  the tamper-resistance term's attacked copy (--tamper_weight): a plain model on every GPU
            with its gradients and AdamW's two moments, all 16-bit: 8, never partitioned

With ``--offload cpu`` the optimizer (and, under ZeRO-3, the parameters: ds_configs/zero3_offload.json
offloads both) move to host memory. Host memory per node is DeepSpeed's number: the larger of the
offloaded states and the fp32 copies made while loading the model, times a 1.5 buffer factor.

Activations follow Korthikanti et al. 2022 (see ``activation_bytes_per_sequence``). The micro-batch
counts examples, as the trainer's ``--micro_batch_size`` does: each example is 1 + K sequences of
``--seq_len`` tokens (its harmless response and its K harmful ones, ``--negatives K``). It is an upper
bound from a first-order model: allocator fragmentation, communication buckets and the loss's own
temporaries come out of ``--reserve_gib``.

Options are written ``--gpus_per_node`` or ``--gpus-per-node`` alike (and can come from ``--config FILE``).
"""
import math
import sys
from dataclasses import dataclass, field
from typing import Literal

from ..app.options import OptionError, parse_options

GIB = 2 ** 30
# DeepSpeed's estimators model mixed-precision Adam only: 16-bit weights and activations.
BYTES_16BIT = 2


@dataclass
class MemoryOptions:
    """The options of ``python -m wpn_dist.memory``; their defaults are ``plan``'s too."""
    model: str = field(metadata={"help": "A name from wpn_dist.app.models.MODEL_SPECS, a local Hugging Face "
                                         "model directory, or a hub id (only its config.json is fetched)."})
    nodes: int = field(default=1, metadata={"help": "Nodes of the job."})
    gpus_per_node: int = field(default=8, metadata={"help": "GPUs per node."})
    offload: Literal["none", "cpu"] = field(default="none", metadata={
        "help": "The rows to mark as selected: model states on the GPUs, or offloaded to host memory."})
    gpu_memory_gib: float = field(default=80.0, metadata={"help": "Memory of one GPU, GiB."})
    reserve_gib: float = field(default=2.0, metadata={
        "help": "GPU memory kept for CUDA context, NCCL and fragmentation, GiB."})
    seq_len: int = field(default=2048, metadata={
        "help": "Tokens per sequence (prompt + response: the trainer's --max_length)."})
    negatives: int = field(default=1, metadata={
        "help": "K, harmful responses per example: an example of the micro-batch is 1 + K sequences "
                "(PKU-SafeRLHF rows have 1, the toy world's 2)."})
    # Only 16-bit: DeepSpeed's model-state estimators assume mixed precision; bf16 and fp16 cost the same.
    precision: Literal["bf16", "fp16"] = field(default="bf16", metadata={"help": "16-bit mixed precision."})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "The trainer's --keep_checkpoints: for the disk figures (checkpoints kept, plus one being written)."})
    frozen_model: bool = field(default=True, metadata={
        "help": "Count the frozen original model the run holds as a second engine (WPN's default, for its N-pair "
                "candidates and retention term, and the baselines' KL terms). --no_frozen_model: a run without "
                "one (e.g. --frozen_side none --retention_weight 0, GA, NPO)."})
    tamper_copy: bool = field(default=False, metadata={
        "help": "Count the tamper-resistance term's attacked copy (--tamper_weight > 0): a whole model with its "
                "gradients and AdamW state on every GPU."})
    zero_init: bool = field(default=True, metadata={
        "help": "Model built under deepspeed.zero.Init. --no_zero_init (or --no-zero-init): built without it, "
                "as wpn_dist's random init does, so each process holds the whole fp32 model while loading."})

    def __post_init__(self):
        for name in ("nodes", "gpus_per_node", "seq_len"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.negatives < 0:
            raise OptionError(f"--negatives must be >= 0, got {self.negatives}")
        if self.gpu_memory_gib <= 0 or self.reserve_gib < 0:
            raise OptionError("--gpu_memory_gib must be > 0 and --reserve_gib >= 0")


_DEFAULT = {name: getattr(MemoryOptions, name) for name in ("reserve_gib", "offload", "negatives", "zero_init",
                                                             "precision", "frozen_model", "tamper_copy")}


def count_model(model):
    """(total, largest_layer) parameter counts of a built (meta-device) model.

    ``model.parameters()`` lists a tied weight once, as DeepSpeed's ``model_to_params`` does by
    data pointer (meta tensors have none). The largest layer is the largest count of parameters
    that one module owns directly, which is what ZeRO-3 gathers at once: usually the embedding.
    """
    total = sum(p.numel() for p in model.parameters())
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest_layer


def describe_model(name: str) -> dict:
    """Sizes of a ``MODEL_SPECS`` name or a local Hugging Face model directory, from a model built
    on the meta device (no weights allocated, nothing downloaded). Raises ValueError if unknown."""
    from wpn_dist.app.models import check_model_name, meta_model
    check_model_name(name)  # before importing transformers: a typo fails fast
    model = meta_model(name)
    config = model.config
    num_params, largest_layer_params = count_model(model)
    # Standard config names; Hugging Face maps family-specific ones (n_layer, n_embd, ...) to them.
    return dict(num_params=num_params, largest_layer_params=largest_layer_params,
                num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                num_heads=config.num_attention_heads, vocab_size=config.vocab_size)


def activation_bytes_per_sequence(seq_len, num_layers, hidden_size, num_heads, vocab_size,
                                  checkpointing: bool) -> int:
    """Activation memory of one sequence (micro-batch 1) in the forward/backward pass, in bytes.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
    (arXiv:2205.05198), eq. 1: one transformer layer stores s*b*h*(34 + 5*a*s/h) bytes of 16-bit
    activations without recomputation and without tensor parallelism (s sequence length, b micro-batch,
    h hidden size, a heads; the 5*a*s/h term is the attention scores, softmax and dropout mask).
    With full activation checkpointing only each layer's input, 2*s*b*h bytes, is kept, plus one
    layer's full activations while that layer is recomputed in the backward pass (sec. 4.1).

    On top, the logits in fp32 for the loss: s * vocab * 4 bytes. The formula assumes the attention
    matrix is materialised; fused (flash) attention makes the 5*a*s/h term smaller, so the number
    is conservative for long sequences.
    """
    s, h, a = seq_len, hidden_size, num_heads
    full_layer = s * h * (34 + 5 * a * s / h)
    if checkpointing:
        layers = num_layers * BYTES_16BIT * s * h + full_layer
    else:
        layers = num_layers * full_layer
    logits = s * vocab_size * 4
    return int(layers + logits)


def model_states(stage, offload, num_params, largest_layer_params, nodes, gpus_per_node,
                 offload_params=True, zero_init=True, buffer_factor=1.5, frozen_model=False,
                 tamper_copy=False) -> dict:
    """Bytes of model states: per GPU (params, grads, optim, gather, frozen, tamper, total) and host
    memory per node (params, grads, optim, frozen, load, total). Without the frozen model and the
    tamper copy they sum to DeepSpeed's estimator totals for the same inputs.

    Host ``total`` = max(params + grads + optim + frozen, load) * buffer_factor, where ``load`` is the fp32
    copies made while loading. The counts are DeepSpeed's, including two of its choices: ZeRO-2
    offload keeps the whole model's optimizer on every host and counts load copies for all GPUs of
    the job; ZeRO-3 offload with zero.Init counts no load copies.
    """
    P, n_gpus = num_params, nodes * gpus_per_node
    gpu = dict(params=0.0, grads=0.0, optim=0.0, gather=0.0, frozen=0.0, tamper=0.0)
    cpu = dict(params=0.0, grads=0.0, optim=0.0, frozen=0.0, load=0.0)
    if stage == 2:
        gpu["params"] = 2 * P  # 16-bit weights stay whole on every GPU
        if offload:
            cpu.update(grads=4 * P, optim=12 * P, load=4 * P * n_gpus)
        else:
            gpu.update(grads=6 * P / n_gpus, optim=12 * P / n_gpus)
            cpu["load"] = 4 * P * gpus_per_node  # each process loads the fp32 model once
    elif stage == 3:
        gpu["gather"] = 4 * largest_layer_params
        # Without zero.Init every process builds the whole fp32 model before partitioning it;
        # with it, one module at a time.
        load = 4 * (P if not zero_init else largest_layer_params) * gpus_per_node
        if not offload:
            gpu.update(params=2 * P / n_gpus, grads=4 * P / n_gpus, optim=12 * P / n_gpus)
            cpu["load"] = load
        else:
            on_params = cpu if offload_params else gpu
            on_params["params"] = 2 * P / (nodes if offload_params else n_gpus)
            cpu.update(grads=4 * P / nodes, optim=12 * P / nodes, load=0 if zero_init else load)
    else:
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage}")
    if frozen_model:  # 16-bit weights, partitioned and offloaded as the trained model's are (engine.py)
        if stage == 2:
            gpu["frozen"] = 2 * P
        elif offload and offload_params:
            cpu["frozen"] = 2 * P / nodes
        else:
            gpu["frozen"] = 2 * P / n_gpus
    if tamper_copy:  # weights, gradients and AdamW's two moments of a plain 16-bit model (tamper.py)
        gpu["tamper"] = 8 * P
    gpu["total"] = sum(gpu.values())
    cpu["total"] = max(cpu["params"] + cpu["grads"] + cpu["optim"] + cpu["frozen"], cpu["load"]) * buffer_factor
    return dict(gpu_bytes=gpu, cpu_per_node_bytes=cpu)


def plan(num_params, largest_layer_params, num_layers, hidden_size, num_heads, vocab_size,
         nodes, gpus_per_node, seq_len, gpu_memory_gib, reserve_gib=_DEFAULT["reserve_gib"],
         offload=_DEFAULT["offload"], offload_params=True, zero_init=_DEFAULT["zero_init"], buffer_factor=1.5,
         precision=_DEFAULT["precision"], negatives=_DEFAULT["negatives"], frozen_model=_DEFAULT["frozen_model"],
         tamper_copy=_DEFAULT["tamper_copy"]) -> dict:
    """Model states and largest micro-batch for ZeRO-2/3 with and without CPU offload.

    The micro-batch counts examples, as the trainer's ``--micro_batch_size``: each example is
    ``1 + negatives`` sequences of ``seq_len`` tokens (its positive and its K negatives).

    Returns ``{"inputs": ..., "sequences_per_example": 1 + negatives,
    "activation_bytes_per_sequence": {"full", "checkpointed"}, "activation_bytes_per_example": {...},
    "rows": [...]}``; each row has ``stage``, ``offload``, ``selected`` (matches ``offload``),
    ``gpu_bytes`` and ``cpu_per_node_bytes`` (see ``model_states``), ``gpu_per_node_bytes``,
    ``free_for_activations_bytes``, ``fits`` (model states + reserve fit the GPU),
    ``max_micro_batch`` {"full", "checkpointed"} in examples (0 when it does not fit) and
    ``max_micro_batch_sequences`` (the same in sequences).
    """
    inputs = dict(locals())  # first statement: the arguments only
    if offload not in ("none", "cpu"):
        raise ValueError(f"offload must be 'none' or 'cpu', got {offload!r}")
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision must be bf16 or fp16 (16-bit mixed precision), got {precision!r}")
    if negatives < 0:
        raise ValueError(f"negatives must be >= 0, got {negatives}")
    act = {mode: activation_bytes_per_sequence(seq_len, num_layers, hidden_size, num_heads, vocab_size,
                                               checkpointing=(mode == "checkpointed"))
           for mode in ("full", "checkpointed")}
    # Every activation term is linear in the sequences of the micro-batch (s*b*h, Korthikanti et al.).
    sequences_per_example = 1 + negatives
    act_example = {mode: sequences_per_example * act[mode] for mode in act}
    rows = []
    for stage in (2, 3):
        for off in ("none", "cpu"):
            row = dict(stage=stage, offload=off, selected=(off == offload))
            row.update(model_states(stage, off == "cpu", num_params, largest_layer_params, nodes,
                                    gpus_per_node, offload_params, zero_init, buffer_factor, frozen_model,
                                    tamper_copy))
            row["gpu_per_node_bytes"] = {k: v * gpus_per_node for k, v in row["gpu_bytes"].items()}
            free = (gpu_memory_gib - reserve_gib) * GIB - row["gpu_bytes"]["total"]
            row["free_for_activations_bytes"] = free
            row["fits"] = free > 0
            row["max_micro_batch"] = {mode: max(0, math.floor(free / act_example[mode])) for mode in act}
            row["max_micro_batch_sequences"] = {mode: n * sequences_per_example
                                                for mode, n in row["max_micro_batch"].items()}
            rows.append(row)
    return dict(inputs=inputs, sequences_per_example=sequences_per_example, activation_bytes_per_sequence=act,
                activation_bytes_per_example=act_example, rows=rows)


def format_plan(p: dict, model_name: str) -> str:
    inp, act, seqs = p["inputs"], p["activation_bytes_per_sequence"], p["sequences_per_example"]
    parts = ("params", "grads", "optim")
    gpu_parts = parts + ("gather", "frozen", "tamper", "total")
    cols = lambda names: "".join(f"{n:>9}" for n in names)  # noqa: E731
    gib = lambda d, names: "".join(f"{d[n] / GIB:9.1f}" for n in names)  # noqa: E731
    lines = [
        f"{model_name}: {inp['num_params'] / 1e9:.2f}B params, largest layer "
        f"{inp['largest_layer_params'] / 1e6:.1f}M; {inp['nodes']} node(s) x {inp['gpus_per_node']} GPU(s); "
        f"{inp['precision']} mixed-precision Adam; seq len {inp['seq_len']}; "
        f"{inp['gpu_memory_gib']:g} GiB per GPU, {inp['reserve_gib']:g} GiB reserved",
        "offload = optimizer" + (" and parameters" if inp["offload_params"] else "") +
        " in host memory (ZeRO-2 offloads the optimizer only); * = selected by --offload; model built "
        + ("under" if inp["zero_init"] else "without") + " zero.Init",
        f"micro-batch = examples per GPU per forward pass, as the trainer's --micro_batch_size; an example is "
        f"1 + K = {seqs} sequence(s) of {inp['seq_len']} tokens (--negatives {inp['negatives']})",
        "",
        "frozen = the frozen original model's engine ("
        + ("counted" if inp["frozen_model"] else "not counted: --no_frozen_model") + "); "
        "tamper = the tamper term's attacked copy ("
        + ("counted" if inp["tamper_copy"] else "not counted: --tamper_copy to count it") + ")",
        "",
        f"{'':<80}|{'max micro-batch: examples (seqs)':^34}",
        f"{'Per GPU (GiB)':<17}{cols(gpu_parts)} |{'no ckpt':>17}{'ckpt':>17}",
    ]
    for r in p["rows"]:
        mb, sq = r["max_micro_batch"], r["max_micro_batch_sequences"]
        lines.append(f"{_label(r)}{gib(r['gpu_bytes'], gpu_parts)} |"
                     + "".join(f"{f'{mb[m]} ({sq[m]})':>17}" for m in ("full", "checkpointed"))
                     + ("" if r["fits"] else "  (model states alone do not fit)"))
    lines += ["", f"{'Per node (GiB)':<17}{'--- on the GPUs ---':^63} |{'--- in host memory ---':^54}",
              f"{'':<17}{cols(gpu_parts)} |{cols(parts + ('frozen', 'load*', 'total'))}"]
    for r in p["rows"]:
        lines.append(f"{_label(r)}{gib(r['gpu_per_node_bytes'], gpu_parts)} |"
                     f"{gib(r['cpu_per_node_bytes'], parts + ('frozen', 'load', 'total'))}")
    lines += ["", "load* = fp32 copies made while loading the model; host total = max(params + grads + optim + frozen,"
                  f" load) x {inp['buffer_factor']:g}, as DeepSpeed's estimators count it",
              "(for ZeRO-2 offload DeepSpeed counts one fp32 copy per GPU of the whole job).",
              f"Activations per sequence: {act['full'] / GIB:.2f} GiB without checkpointing, "
              f"{act['checkpointed'] / GIB:.2f} GiB with full activation checkpointing "
              f"(Korthikanti et al. 2022, plus fp32 logits); per example {seqs} times that."]
    return "\n".join(line.rstrip() for line in lines)


def _label(row) -> str:
    mark = "*" if row["selected"] else " "
    return f"{mark} ZeRO-{row['stage']} {'offload' if row['offload'] == 'cpu' else 'on GPU':<8}"


def parse_args(argv=None) -> MemoryOptions:
    """defaults < --config file < command line; raises OptionError (one line) on a bad option."""
    (options,), _ = parse_options((MemoryOptions,), argv, prog="python -m wpn_dist.memory", description=__doc__)
    return options


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        sizes = describe_model(args.model)
    except (ValueError, OSError) as e:  # OptionError is a ValueError; OSError: unreadable config.json
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = plan(**sizes, nodes=args.nodes, gpus_per_node=args.gpus_per_node, seq_len=args.seq_len,
             gpu_memory_gib=args.gpu_memory_gib, reserve_gib=args.reserve_gib, offload=args.offload,
             zero_init=args.zero_init, precision=args.precision, negatives=args.negatives,
             frozen_model=args.frozen_model, tamper_copy=args.tamper_copy)
    print(format_plan(p, args.model))
    from ..app.checkpoint import describe_disk, disk_needs
    print(describe_disk(disk_needs(sizes["num_params"], args.precision, args.keep_checkpoints, BYTES_16BIT),
                        args.keep_checkpoints) + f" ({args.precision})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
