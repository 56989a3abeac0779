"""Projection of measured single-node rows to many nodes, with a stated communication model.

    python -m wpn_dist.scaling --project --out DIR --nodes 1,2,4,8 --gpus_per_node 8 \\
        --link_gbps 200 --latency_us 5 [--intra_node_gbps 2400] [--overlap] [--global_batch N]

Every projected row is marked ``projected: true`` and written to ``DIR/projected.csv``; nothing here
is a measurement.

Assumptions (also in docs/benchmarks.md):

1. Compute scales with the per-GPU batch. Without ``--global_batch`` the per-GPU micro-batch stays the
   measured one (weak scaling) and so does the per-GPU compute time: the measured median step time,
   whatever communication it held on its own node included. With ``--global_batch N`` (examples) the
   per-GPU batch is N / W and the compute time is scaled linearly by (N / W) / measured micro-batch.
2. Communication per step and GPU, with W = nodes x gpus_per_node ranks, P parameters, b bytes per
   value (2 for bf16, 4 for fp32), f = (W - 1) / W (a ring collective moves f x size through every GPU):
   - ZeRO-3: parameters all-gathered in the forward and again in the backward (recompute or backward),
     gradients reduce-scattered: 3 x f x P x b; the frozen reference engine of ga/icu, partitioned the
     same way, adds one all-gather: f x P x b.
   - ZeRO-2: gradients reduce-scattered, updated parameters all-gathered: 2 x f x P x b.
   - no ZeRO (stage 0): gradients all-reduced: 2 x f x P x b.
   - WPN's gathered negatives (global negatives): G = W x micro-batch x K pooled fp32 vectors of the
     hidden size d: the forward all-gather moves f x G x d x 4 bytes and the backward, an all-reduce of
     the gathered gradient in wpn_dist.distributed, 2 x f x G x d x 4 bytes.
3. Time of that volume: bytes / bandwidth, the bandwidth being ``--link_gbps`` (per GPU, between
   nodes) when the job spans nodes and ``--intra_node_gbps`` within one node, plus a latency term:
   every collective call costs (W - 1) x ``--latency_us`` (twice that for an all-reduce). Calls per
   step: ZeRO-3 gathers module by module, 2 x (L + 2) all-gathers (L layers, embeddings, head), plus
   ceil(P / bucket) reduce-scatters (``--bucket_elems``, DeepSpeed's reduce_bucket_size of ds_configs/);
   ZeRO-2 and stage 0 ceil(P / bucket) reductions (and gathers); two for the negatives.
4. Communication is not overlapped with compute (step = compute + communication) unless
   ``--overlap`` (step = max(compute, communication)). Offload traffic over PCIe is part of the
   measured compute time and does not change with the node count.
"""
import math

ASSUMPTIONS = ("weak scaling unless --global_batch; compute per GPU = measured median step time scaled by "
               "per-GPU batch; ring collectives; ZeRO-3 3xf*P*b (+f*P*b reference), ZeRO-2 and stage 0 2xf*P*b; "
               "negatives f*G*d*4 forward + 2f*G*d*4 backward; latency (W-1)*latency per call; "
               "not overlapped unless --overlap")
PROJECTED_COLUMNS = [
    "projected", "source_point_id", "label", "model", "method", "negatives", "seq_len", "precision", "ds_config",
    "zero_stage", "activation_checkpointing", "num_params", "measured_world_size", "measured_micro_batch",
    "measured_step_time_s", "device_name", "nodes", "gpus_per_node", "world_size", "per_gpu_micro_batch",
    "link_gbps", "intra_node_gbps", "latency_us", "overlap", "param_comm_bytes_per_gpu",
    "negatives_comm_bytes_per_gpu", "collective_calls", "compute_time_s", "comm_time_s", "step_time_s",
    "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "assumptions",
]


def communication(row: dict, world: int, per_gpu_batch: float, bandwidth_bytes_s: float, latency_s: float,
                  bucket_elems: float) -> dict:
    """Bytes each GPU moves per step and the time they take, for a measured row at ``world`` ranks."""
    if world <= 1:
        return {"param_comm_bytes_per_gpu": 0.0, "negatives_comm_bytes_per_gpu": 0.0, "collective_calls": 0,
                "comm_time_s": 0.0}
    f = (world - 1) / world
    params, width = row["num_params"], 2 if row["precision"] == "bf16" else 4
    buckets = math.ceil(params / bucket_elems)
    stage = row["zero_stage"]
    if stage == 3:
        volumes = 3
        gathers, reductions = 2 * (row["num_layers"] + 2), buckets
        if row.get("reference_tokens_per_step"):
            volumes += 1
            gathers += row["num_layers"] + 2
    elif stage in (1, 2):
        volumes, gathers, reductions = 2, buckets, buckets
    else:
        volumes, gathers, reductions = 2, 0, 2 * buckets  # an all-reduce costs two ring passes
    param_bytes = volumes * f * params * width
    negative_bytes, negative_calls = 0.0, 0
    if row["method"] == "wpn" and row.get("global_negatives"):
        gathered = world * per_gpu_batch * row["negatives"]
        negative_bytes = 3 * f * gathered * row["hidden_size"] * 4
        negative_calls = 3
    calls = gathers + reductions + negative_calls
    seconds = (param_bytes + negative_bytes) / bandwidth_bytes_s + calls * (world - 1) * latency_s
    return {"param_comm_bytes_per_gpu": param_bytes, "negatives_comm_bytes_per_gpu": negative_bytes,
            "collective_calls": calls, "comm_time_s": seconds}


def project(rows: list, nodes: list, gpus_per_node: int, link_gbps: float, latency_us: float,
            intra_node_gbps: float = 2400.0, overlap: bool = False, global_batch: int | None = None,
            bucket_elems: float = 5e7) -> list:
    """Projected rows: every measured (status ok, not toy) row at every node count."""
    out = []
    for row in rows:
        if row.get("status") != "ok" or row.get("toy") or row.get("step_time_median_s") is None:
            continue
        measured_batch = row["micro_batch"]
        tokens_per_gpu = row["tokens_per_step"] / row["world_size"]
        for n in nodes:
            world = n * gpus_per_node
            per_gpu_batch = global_batch / world if global_batch else measured_batch
            scale = per_gpu_batch / measured_batch
            compute = row["step_time_median_s"] * scale
            gbps = link_gbps if n > 1 else intra_node_gbps
            comm = communication(row, world, per_gpu_batch, gbps * 1e9 / 8, latency_us * 1e-6, bucket_elems)
            step = max(compute, comm["comm_time_s"]) if overlap else compute + comm["comm_time_s"]
            tokens_per_s = tokens_per_gpu * scale * world / step
            out.append({
                "projected": True, "source_point_id": row["point_id"], "label": row["label"],
                **{k: row.get(k) for k in ("model", "method", "negatives", "seq_len", "precision", "ds_config",
                                           "zero_stage", "activation_checkpointing", "num_params", "device_name")},
                "measured_world_size": row["world_size"], "measured_micro_batch": measured_batch,
                "measured_step_time_s": row["step_time_median_s"], "nodes": n, "gpus_per_node": gpus_per_node,
                "world_size": world, "per_gpu_micro_batch": per_gpu_batch, "link_gbps": link_gbps,
                "intra_node_gbps": intra_node_gbps, "latency_us": latency_us, "overlap": overlap, **comm,
                "compute_time_s": compute, "step_time_s": step, "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_gpu": tokens_per_s / world,
                "mfu": row["mfu"] * compute / step if row.get("mfu") is not None else None,
                "assumptions": ASSUMPTIONS,
            })
    return out


def write_tensorboard(projected: list, out: str) -> None:
    """tensorboard runs ``projection-<label>``: tokens/s and communication time against the node count."""
    import os
    from torch.utils.tensorboard import SummaryWriter
    by_source = {}
    for row in projected:
        by_source.setdefault((row["source_point_id"], row["label"]), []).append(row)
    for (source, label), members in by_source.items():
        writer = SummaryWriter(os.path.join(out, "tensorboard", f"projection-{label}-{source[:8]}"))
        for row in members:
            writer.add_scalar("projection/tokens_per_s", row["tokens_per_s"], row["nodes"])
            writer.add_scalar("projection/comm_time_s", row["comm_time_s"], row["nodes"])
        writer.close()
