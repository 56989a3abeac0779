from setuptools import find_packages, setup

setup(
    name="wpn_dist",
    version="0.1.0",
    description="WPN unlearning (N-pair contrastive) for large causal LMs under DeepSpeed ZeRO-3",
    # ds_configs/ stays at the top of the checkout and is installed as the package data
    # wpn_dist/ds_configs/ (read by wpn_dist/app/engine.py: the checkout's, else the installed one),
    # so that `pip install .` has the named --ds_config files too. slurm/ is not shipped: its
    # templates run from a checkout.
    packages=find_packages(include=["wpn_dist", "wpn_dist.*"]) + ["wpn_dist.ds_configs"],
    package_dir={"wpn_dist.ds_configs": "ds_configs"},
    package_data={"wpn_dist.ds_configs": ["*.json", "*.yaml"]},
    entry_points={"console_scripts": [
        "wpn-train = wpn_dist.train:main",          # = deepspeed/torchrun/srun ... wpn_dist/train.py
        "wpn-evaluate = wpn_dist.evaluate:main",
        "wpn-toybench = wpn_dist.toybench:main",
        "wpn-scaling = wpn_dist.scaling:main",
        "wpn-memory = wpn_dist.memory:main",
        "wpn-prepare = wpn_dist.prepare:main",
        "wpn-export = wpn_dist.export:main",
        "wpn-tiny-model = wpn_dist.tiny_model:main",
    ]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        # Floor 5.0.0: from_pretrained without dtype= must load config.json's dtype (v5 default "auto";
        # 4.x loads fp32, so a bf16 export_hf comes back fp32), and OPT/GPT-Neo/GPT-J must honour
        # logits_to_keep= (added in v5; 4.x ignores it). dtype= itself needs >=4.56.
        # .ci/floor-tests.sh reads this line and tests against exactly this version.
        "transformers>=5.0.0,<6",
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
