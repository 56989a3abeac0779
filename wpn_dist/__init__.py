"""wpn_dist: WPN unlearning (N-pair contrastive learning over position-weighted pooled hidden
states) for large causal LMs under DeepSpeed ZeRO-3."""
__version__ = "0.1.0"
