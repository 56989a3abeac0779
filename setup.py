from setuptools import find_packages, setup

setup(
    name="wpn_dist",
    version="0.1.0",
    description="WPN unlearning (N-pair contrastive) for large causal LMs under DeepSpeed ZeRO-3",
    packages=find_packages(include=["wpn_dist", "wpn_dist.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.46,<6",
        "datasets>=3.0",
        "accelerate>=1.0",
        "tensorboard>=2.14",
        "tokenizers>=0.20",
        "tqdm",
        "pyyaml",
        "psutil",
    ],
    extras_require={
        # Plots of the toy benchmark and the scaling study.
        "bench": ["matplotlib>=3.7"],
        # Utility on lm-evaluation-harness tasks (python -m wpn_dist.evaluate --lm_eval_tasks ...).
        "lmeval": ["lm-eval>=0.4.5"],
        "test": ["pytest>=8", "matplotlib>=3.7", "lm-eval>=0.4.5"],
    },
)
