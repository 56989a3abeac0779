"""The toy implant is bit-identical whatever the torch thread count; toy commands run on fixed CPU
kernels (wpn_dist/app/kernels.py); results record library versions and kernels."""
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, cpu_env
from wpn_dist.app import kernels

# The variables behind the kernels a toy command runs on; the tests' conftest sets NATIVE for the session.
KERNEL_VARIABLES = [*kernels.PINNED, kernels.NATIVE]

# Implants a short toy model in a fresh process (thread count from OMP_NUM_THREADS), checks that the
# caller's settings come back, and prints the implant's fingerprint with its record.
CHILD = r"""
import json, os
import torch
from wpn_dist.app import toy_world as toy
threads = torch.get_num_threads()
assert threads == int(os.environ["OMP_NUM_THREADS"]), threads
world = toy.make_world(toy.ToyWorldConfig(seed=0))
cfg = toy.ImplantConfig(steps=int(os.environ.get("IMPLANT_STEPS", "30")))
out = toy.implant(world, cfg, toy.implant_dir(world.config, cfg), log=lambda message: None)
assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
with open(os.path.join(out, "implant.json")) as f:
    record = json.load(f)
print("RESULT " + json.dumps({"threads": threads, "fingerprint": toy.implant_fingerprint(out), "dir": out,
                             "implant": record}))
"""


def implant_in_subprocess(threads: int, cache: str, steps: int = 30, pinned: bool = False) -> dict:
    """CHILD's implant of ``steps`` steps, on this machine's own kernels or (``pinned``) the toy world's."""
    env = cpu_env(WPN_DIST_CACHE=cache, IMPLANT_STEPS=str(steps), **(kernels.PINNED if pinned else {}))
    env["OMP_NUM_THREADS"] = str(threads)
    if pinned:
        env.pop(kernels.NATIVE, None)
    result = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_implant_is_bit_identical_under_one_and_two_threads(tmp_path):
    one = implant_in_subprocess(1, str(tmp_path / "cache1"))
    two = implant_in_subprocess(2, str(tmp_path / "cache2"))
    assert (one["threads"], two["threads"]) == (1, 2)
    assert one["fingerprint"] == two["fingerprint"]
    for record in (one["implant"], two["implant"]):
        assert record["num_threads"] == 1 and record["deterministic"] is True
        assert record["versions"]["torch"] and record["versions"]["transformers"]


def test_the_fingerprint_tells_one_changed_weight_and_not_a_resaved_copy(tmp_path):
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    from wpn_dist.app import toy_world as toy
    made = implant_in_subprocess(1, str(tmp_path / "cache"))
    assert made["fingerprint"]["final_loss"] == repr(made["implant"]["final_loss"])
    copy = tmp_path / "copy"
    shutil.copytree(made["dir"], copy)
    weights = copy / "model.safetensors"
    state = load_file(str(weights))
    save_file({name: state[name] for name in reversed(sorted(state))}, str(weights), metadata={"other": "metadata"})
    assert toy.implant_fingerprint(str(copy)) == made["fingerprint"]  # the same tensors, another file
    name = sorted(state)[0]
    state[name].view(-1)[0] = torch.nextafter(state[name].view(-1)[0], torch.tensor(1e9))  # one ulp
    save_file(state, str(weights))
    changed = toy.implant_fingerprint(str(copy))
    assert changed["weights_sha256"] != made["fingerprint"]["weights_sha256"]
    assert changed["final_loss"] == made["fingerprint"]["final_loss"]


def test_library_versions():
    from wpn_dist.app import versions
    info = versions.library_versions()
    for name in ("torch", "transformers", "deepspeed"):
        assert isinstance(info[name], str) and info[name], name
    assert {"python", "datasets", "accelerate", "wpn_dist", "cpu_model", "torch_num_threads"} <= set(info)
    assert isinstance(info["torch_num_threads"], int)
    json.dumps(info)  # it goes into results files as is
    assert versions._version("wpn_dist_no_such_library") is None
    assert info["cpu_kernels"] == kernels.kernel_settings() and set(info["cpu_kernels"]) == set(kernels.PINNED)


def test_has_avx2_reads_the_cpu_flags(tmp_path):
    with_avx2, without = tmp_path / "a", tmp_path / "b"
    with_avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2x\n")  # a longer flag is not avx2
    assert kernels.has_avx2(str(with_avx2)) and not kernels.has_avx2(str(without))
    assert not kernels.has_avx2(str(tmp_path / "missing"))


# Runs pin_toy_kernels, then prints what the libraries see: the code before the call runs twice when
# the process is re-executed.
PIN_CHILD = r"""
import json, os, sys
print("START", flush=True)
from wpn_dist.app.kernels import PINNED, pin_toy_kernels
pin_toy_kernels()
import torch
print("RESULT " + json.dumps({"env": {name: os.environ.get(name) for name in PINNED}, "argv": sys.argv[1:],
                             "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def pin_in_subprocess(**user_env) -> tuple:
    env = {k: v for k, v in cpu_env(**user_env).items() if k not in KERNEL_VARIABLES or k in user_env}
    result = subprocess.run([sys.executable, "-c", PIN_CHILD, "an-argument"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(line) == 1, result.stdout
    return json.loads(line[0][len("RESULT "):]), result.stdout


@pytest.mark.skipif(not kernels.has_avx2(), reason="the kernels are pinned on x86 CPUs with AVX2 only")
def test_pin_toy_kernels_reexecutes_with_the_kernels_fixed_and_keeps_what_the_user_set():
    seen, stdout = pin_in_subprocess()
    assert stdout.count("START") == 2 and stdout.count("fixed CPU kernels") == 1  # re-executed once
    assert seen["env"] == kernels.PINNED and seen["capability"] == "AVX2" and seen["argv"] == ["an-argument"]
    seen, stdout = pin_in_subprocess(ATEN_CPU_CAPABILITY="default")
    assert seen["capability"] == "DEFAULT" and seen["env"] == dict(kernels.PINNED, ATEN_CPU_CAPABILITY="default")
    seen, stdout = pin_in_subprocess(**kernels.PINNED)  # already pinned: nothing to do
    assert stdout.count("START") == 1 and "fixed CPU kernels" not in stdout
    seen, stdout = pin_in_subprocess(WPN_DIST_NATIVE_KERNELS="1")  # the machine's own kernels
    assert stdout.count("START") == 1 and seen["env"] == dict.fromkeys(kernels.PINNED)


def test_pin_toy_kernels_without_avx2_says_so_and_goes_on(monkeypatch):
    for name in KERNEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kernels, "has_avx2", lambda: False)
    said = []
    kernels.pin_toy_kernels(log=said.append)  # returns: no re-execution
    assert len(said) == 1 and "no AVX2" in said[0] and kernels.missing() == kernels.PINNED


@pytest.mark.skipif(not kernels.has_avx2(), reason="the kernels are pinned on x86 CPUs with AVX2 only")
def test_the_train_command_pins_the_kernels_of_a_toy_run_before_its_checks(tmp_path):
    """The re-executed trainer sees the same command line: its check of the options still runs."""
    env = {k: v for k, v in cpu_env().items() if k not in KERNEL_VARIABLES}
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p", "harmful": "h", "harmless": "s"}\n')
    result = subprocess.run([sys.executable, "wpn_dist/train.py", "--data", str(rows), "--output_dir",
                             str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "with your own --data pass --model too" in out, out[-3000:]
    assert out.count("fixed CPU kernels (ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=AVX2)") == 1
    assert not (tmp_path / "run").exists()


def test_an_implant_made_with_other_kernels_is_another_cache_entry(monkeypatch):
    from wpn_dist.app import toy_world as toy
    world_cfg, implant_cfg = toy.ToyWorldConfig(seed=0), toy.ImplantConfig()
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    pinned = toy.implant_dir(world_cfg, implant_cfg)
    monkeypatch.setenv("MKL_CBWR", "AUTO")
    assert toy.implant_dir(world_cfg, implant_cfg) != pinned
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert toy.implant_dir(world_cfg, implant_cfg) == pinned


# The same short implant as CHILD, on the toy world's pinned kernels, twice: with the toy world's
# optimizer (torch's fused AdamW) and, as the control, with torch's unfused AdamW; prints both fingerprints.
VENDOR_CHILD = r"""
import json
import torch
from wpn_dist.app import toy_world as toy
world = toy.make_world(toy.ToyWorldConfig(seed=0))
fingerprints = {}
for name in ("fused", "unfused"):
    if name == "unfused":
        class Unfused(torch.optim.AdamW):
            def __init__(self, *args, fused=None, **kwargs):
                super().__init__(*args, foreach=False, **kwargs)
        torch.optim.AdamW = Unfused
    cfg = toy.ImplantConfig(steps=3)
    out = toy.implant(world, cfg, toy.implant_dir(world.config, cfg) + "-" + name, log=lambda message: None)
    fingerprints[name] = toy.implant_fingerprint(out)
print("RESULT " + json.dumps(fingerprints))
"""
QEMU = shutil.which("qemu-x86_64")
EMULATED_CPU = "Haswell-v4"  # an Intel CPU with AVX2 and FMA, as qemu emulates it


def vendor_implants(tmp_path, cpu=None) -> dict:
    """The fingerprints of VENDOR_CHILD's implants, on this CPU or on qemu's emulation of ``cpu``."""
    env = cpu_env(WPN_DIST_CACHE=str(tmp_path / f"cache-{cpu}"), **kernels.PINNED)
    env.pop(kernels.NATIVE, None)
    python = os.path.realpath(sys.executable)  # qemu runs a binary, not a shim script
    command = ([QEMU, "-cpu", cpu] if cpu else []) + [python, "-c", VENDOR_CHILD]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64" or not kernels.has_avx2(),
                    reason="needs qemu-x86_64 (Debian's qemu-user; .ci/run installs it) on an x86 CPU with AVX2")
def test_implant_is_the_same_on_an_emulated_intel_cpu(tmp_path):
    """The toy implant on the pinned kernels gives the same weights on this CPU and on an Intel CPU that
    qemu emulates (CPUID tells MKL and torch which CPU they run on; qemu computes every instruction by
    its definition). The control shows that the check can tell: torch's unfused AdamW takes its square
    root from MKL's vector maths, whose last bit depends on the CPU (wpn_dist/app/kernels.py), and its
    implant differs between this CPU and the emulated one."""
    here, emulated = vendor_implants(tmp_path), vendor_implants(tmp_path, EMULATED_CPU)
    assert emulated["fused"] == here["fused"]
    assert emulated["unfused"] != here["unfused"]
