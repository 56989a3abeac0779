"""The toy implant is bit-identical whatever the torch thread count, and results record library versions."""
import json
import subprocess
import sys

from conftest import REPO, cpu_env

# Implants a short toy model in a fresh process (thread count from OMP_NUM_THREADS), checks that the
# caller's settings come back, and prints a sha256 over the saved state dict's tensors (names, dtypes,
# shapes, bytes; not the file's bytes, whose metadata may vary) with the implant's record.
CHILD = r"""
import glob, hashlib, json, os, sys
import torch
from safetensors.torch import load_file
from wpn_dist.app import toy_world as toy
threads = torch.get_num_threads()
assert threads == int(os.environ["OMP_NUM_THREADS"]), threads
world = toy.make_world(toy.ToyWorldConfig(seed=0))
cfg = toy.ImplantConfig(steps=30)
out = toy.implant(world, cfg, toy.implant_dir(world.config, cfg), log=lambda message: None)
assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
state = {}
for path in sorted(glob.glob(os.path.join(out, "*.safetensors"))):
    state.update(load_file(path))
assert state, os.listdir(out)
digest = hashlib.sha256()
for name in sorted(state):
    tensor = state[name].contiguous()
    digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes())
with open(os.path.join(out, "implant.json")) as f:
    record = json.load(f)
print("RESULT " + json.dumps({"threads": threads, "sha256": digest.hexdigest(), "implant": record}))
"""


def implant_in_subprocess(threads: int, cache: str) -> dict:
    env = cpu_env(WPN_DIST_CACHE=cache)
    env["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_implant_is_bit_identical_under_one_and_two_threads(tmp_path):
    one = implant_in_subprocess(1, str(tmp_path / "cache1"))
    two = implant_in_subprocess(2, str(tmp_path / "cache2"))
    assert (one["threads"], two["threads"]) == (1, 2)
    assert one["sha256"] == two["sha256"]
    for record in (one["implant"], two["implant"]):
        assert record["num_threads"] == 1 and record["deterministic"] is True
        assert record["versions"]["torch"] and record["versions"]["transformers"]


def test_library_versions():
    from wpn_dist.app import versions
    info = versions.library_versions()
    for name in ("torch", "transformers", "deepspeed"):
        assert isinstance(info[name], str) and info[name], name
    assert {"python", "datasets", "accelerate", "wpn_dist", "cpu_model", "torch_num_threads"} <= set(info)
    assert isinstance(info["torch_num_threads"], int)
    json.dumps(info)  # it goes into results files as is
    assert versions._version("wpn_dist_no_such_library") is None
