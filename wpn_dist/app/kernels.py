"""The CPU kernels behind the toy world's numbers.

torch (its ATen kernels), MKL (its GEMM code path) and oneDNN each pick their instructions by the CPU
they find, and each choice rounds differently. The toy world is small enough that this rounding
changes what a model learns: on the same machine seed 0's WPN run has relearned @5 22% on torch's
AVX512 kernels and 0% on its AVX2 ones, and sft's OOD harmless rate 73.1% and 88.1%
(docs/toybench/seed0-native.md, seed0-avx2.md). So toy runs fix the kernels to what every x86 CPU of
the last decade has:

- ``ATEN_CPU_CAPABILITY=avx2``: torch's vectorised kernels (softmax, layer norm, elementwise ops);
- ``MKL_CBWR=COMPATIBLE``: MKL's one code path that gives the same results on Intel and other x86
  CPUs (its AVX2 branch is fixed on Intel CPUs only; elsewhere MKL falls back to its own choice);
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's instruction set.

What the pinning does not fix by itself: the square root torch takes on float32 (``torch.sqrt``,
from MKL's vector maths) is not correctly rounded (about one in six results is one unit off in the last
place) and its last bit depends on the CPU: it differs between an AMD EPYC and an Intel CPU that qemu
emulates (an approximate reciprocal-square-root instruction, which each vendor implements its own way,
would explain it). torch's unfused AdamW takes that square root, and with it an Intel Xeon and an AMD
EPYC machine implanted different toy models. The toy world's optimizers are therefore torch's fused
AdamW, whose square root is the exact instruction: the implant, the relearning attack, and every CPU
run through ``wpn_dist/app/engine.py``. Checked against qemu's emulated Intel CPU, which computes every
instruction by its definition (tests/test_toy_determinism.py): the implant and a WPN run give
bit-identical weights there and here; with the unfused optimizer they do not. Results record the
machine, the kernels and the implanted model's fingerprint (``toy_world.implant_fingerprint``), so two
tables can be told apart by where they came from.

The libraries read these when they first compute, so they must be in the environment before that.
``pin_toy_kernels`` re-executes the process with them set; the launched ranks inherit them. A variable
the user has set is left as it is; ``WPN_DIST_NATIVE_KERNELS=1`` leaves all three unset (the machine's
own kernels, as before this pinning).
"""
import os
import sys

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}
NATIVE = "WPN_DIST_NATIVE_KERNELS"  # "1": run on the machine's own kernels


def kernel_settings(env=None) -> dict:
    """The pinned variables as the environment has them (None where unset), for results files."""
    env = os.environ if env is None else env
    return {name: env.get(name) for name in PINNED}


def has_avx2(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this is an x86 CPU with AVX2 (read from /proc/cpuinfo; False where it cannot be read)."""
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and "avx2" in line.split() for line in f)
    except OSError:
        return False


def missing(env=None) -> dict:
    """The pinned variables the environment does not set, with the values they get."""
    env = os.environ if env is None else env
    return {name: value for name, value in PINNED.items() if name not in env}


def pin_toy_kernels(log=print) -> None:  # ranks pass distributed.print0: said once, on rank 0
    """Re-execute this process (same interpreter, same command line) with the kernels pinned, unless
    they already are (set by the caller or by an earlier re-execution), ``WPN_DIST_NATIVE_KERNELS=1``
    asks for the machine's own, or the CPU has no AVX2 (then the numbers may differ from the committed
    tables, and it says so once)."""
    unset = missing()
    if not unset or os.environ.get(NATIVE) == "1":
        return
    if not has_avx2():
        log("wpn_dist: this CPU has no AVX2, so the toy world runs on its own kernels; its numbers may "
            "differ from the committed tables (wpn_dist/app/kernels.py)")
        return
    log("wpn_dist: the toy world runs with fixed CPU kernels ("
        + " ".join(f"{name}={value}" for name, value in unset.items())
        + "), so that its numbers do not depend on the instruction set this CPU offers")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], dict(os.environ, **unset))
