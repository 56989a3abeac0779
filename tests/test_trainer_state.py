"""The trainer's own state (step, data cursor, results, RNG of Python, torch CPU and every CUDA
device) round-trips, and the DeepSpeed config's precision blocks are filled by their own path."""
import json
import random

import torch

from wpn_dist.app import trainer
from wpn_dist.app.config import TrainArguments
from wpn_dist.app.engine import build_ds_config


def test_rng_states_round_trip_on_cpu():
    states = trainer.rng_states()
    expected = (random.random(), torch.rand(3))
    trainer.set_rng_states(states)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def test_cuda_rng_of_every_device_is_saved_and_restored(monkeypatch):
    """No GPU here: the CUDA calls are stand-ins that record what the trainer asks of them."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["device0", "device1"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    states = trainer.rng_states()
    assert states["torch_cuda"] == ["device0", "device1"]
    trainer.set_rng_states(states)
    assert restored == [["device0", "device1"]]


def test_fp16_auto_is_not_the_bf16_flag(tmp_path):
    """A user's fp16 block with "enabled": "auto" used to be filled with the bf16 flag (fp16 on in a
    bf16 run). It is off: this trainer's precisions are fp32 and bf16."""
    config = json.loads(open("ds_configs/zero3.json").read())
    config["fp16"] = {"enabled": "auto", "loss_scale": 0}
    path = tmp_path / "user.json"
    path.write_text(json.dumps(config))
    filled = build_ds_config(TrainArguments(ds_config=str(path), precision="bf16"), 1e-4, 1)
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    filled = build_ds_config(TrainArguments(ds_config=str(path), precision="fp32"), 1e-4, 1)
    assert filled["bf16"]["enabled"] is False and filled["fp16"]["enabled"] is False
