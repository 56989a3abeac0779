"""The library versions and the bits of the machine that decide a run's numbers, for results files.

``library_versions()`` imports each library only when called, and gives None for one that is not
installed (or fails to import), so that recording versions never breaks a run.
"""
import importlib
import platform
import sys

from .kernels import kernel_settings

LIBRARIES = ("torch", "transformers", "deepspeed", "datasets", "accelerate")


def _version(module_name: str):
    """The imported module's ``__version__`` (what actually runs), else its installed distribution's
    version; None when it cannot be imported."""
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
    except Exception:  # not installed, or broken: record None rather than fail the run
        return None
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version
            version = dist_version(module_name)
        except Exception:
            return None
    return str(version)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict:
    """python, torch, transformers, deepspeed, datasets, accelerate and wpn_dist versions (None where
    absent), torch's CUDA version, the CPU model, the CPU kernel set torch dispatches to (AVX2,
    AVX512, ...: it changes floating-point results), the kernel variables wpn_dist/app/kernels.py
    pins, and ``torch.get_num_threads()``."""
    info = {"python": platform.python_version()}
    info.update({name: _version(name) for name in LIBRARIES})
    from .. import __version__ as wpn_dist_version
    info["wpn_dist"] = wpn_dist_version
    info["cuda"] = info["cpu_capability"] = info["torch_num_threads"] = None
    if info["torch"] is not None:
        import torch
        info["cuda"] = torch.version.cuda
        info["torch_num_threads"] = torch.get_num_threads()
        try:
            info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        except Exception:  # older torch
            pass
    info["cpu_kernels"] = kernel_settings()
    try:
        info["cpu_model"] = cpu_model()
    except Exception:
        info["cpu_model"] = None
    return info
