"""The named model specs: the architecture of each family member this package targets, so that a model
can be built with random weights (tests, benchmarks) and its size and FLOPs known without downloading
it, and the hub id its pretrained weights come from. Its own module so that wpn_dist.app.hub (which
turns a name into files) and wpn_dist.app.models (which builds and loads) both read it."""
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "opt", "gpt_neo", "gptj", "gpt_neox"
    hub_id: str | None
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_size: int
    vocab_size: int
    max_positions: int = 2048


MODEL_SPECS = {s.name: s for s in [
    ModelSpec("tiny-opt", "opt", None, 2, 64, 4, 256, 512, 512),
    ModelSpec("tiny-gpt-neo", "gpt_neo", None, 2, 64, 4, 256, 512, 512),
    # OPT's vocabulary on a CPU-sized body: where the LM head's cost shows (the cpu-pku benchmark)
    ModelSpec("mini-opt", "opt", None, 4, 256, 4, 1024, 50272, 2048),
    ModelSpec("opt-125m", "opt", "facebook/opt-125m", 12, 768, 12, 3072, 50272),
    ModelSpec("opt-350m", "opt", "facebook/opt-350m", 24, 1024, 16, 4096, 50272),
    ModelSpec("opt-1.3b", "opt", "facebook/opt-1.3b", 24, 2048, 32, 8192, 50272),
    ModelSpec("opt-2.7b", "opt", "facebook/opt-2.7b", 32, 2560, 32, 10240, 50272),
    ModelSpec("opt-6.7b", "opt", "facebook/opt-6.7b", 32, 4096, 32, 16384, 50272),
    ModelSpec("opt-13b", "opt", "facebook/opt-13b", 40, 5120, 40, 20480, 50272),
    ModelSpec("opt-30b", "opt", "facebook/opt-30b", 48, 7168, 56, 28672, 50272),
    ModelSpec("opt-66b", "opt", "facebook/opt-66b", 64, 9216, 72, 36864, 50272),
    ModelSpec("gpt-neo-125m", "gpt_neo", "EleutherAI/gpt-neo-125m", 12, 768, 12, 3072, 50257),
    ModelSpec("gpt-neo-1.3b", "gpt_neo", "EleutherAI/gpt-neo-1.3B", 24, 2048, 16, 8192, 50257),
    ModelSpec("gpt-neo-2.7b", "gpt_neo", "EleutherAI/gpt-neo-2.7B", 32, 2560, 20, 10240, 50257),
    ModelSpec("gpt-j-6b", "gptj", "EleutherAI/gpt-j-6b", 28, 4096, 16, 16384, 50400),
    ModelSpec("gpt-neox-20b", "gpt_neox", "EleutherAI/gpt-neox-20b", 44, 6144, 64, 24576, 50432),
]}
