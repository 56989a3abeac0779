"""Packaging: `pip install .` (not editable) works like `pip install -e .` (the named DeepSpeed configs
are package data, the console scripts run the commands), and an optional feature whose extra is
missing stops at the start with one line naming the extra."""
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, cpu_env

CONSOLE_SCRIPTS = {"wpn-train": "train", "wpn-evaluate": "evaluate", "wpn-toybench": "toybench",
                   "wpn-scaling": "scaling", "wpn-memory": "memory", "wpn-prepare": "prepare",
                   "wpn-export": "export", "wpn-tiny-model": "tiny_model"}
ONE_LINE_WITHIN_S = 30  # the check comes before any work: imports only (a few seconds on a loaded 2-core box)


# --- setup.py --------------------------------------------------------------------------------------

def test_setup_py_declares_the_console_scripts_and_the_extras():
    from wpn_dist.app.extras import EXTRAS
    text = open(os.path.join(REPO, "setup.py")).read()
    for script, module in CONSOLE_SCRIPTS.items():
        assert f'"{script} = wpn_dist.{module}:main"' in text, script
    for extra, (_, requirement) in EXTRAS.items():  # extras.py's install hint is setup.py's requirement
        assert re.search(rf'"{extra}": \[[^\]]*"{re.escape(requirement)}"', text), (extra, requirement)
    # the shims the scripts point at have a main and keep `python -m wpn_dist.X` working
    for module in CONSOLE_SCRIPTS.values():
        path = os.path.join(REPO, "wpn_dist", f"{module}.py")
        if os.path.isfile(path):  # prepare/export/tiny_model are written by others; check them once they exist
            source = open(path).read()
            assert re.search(r"^(def main\(|from \S+ import (\S+ as )?main\b)", source, re.M), path
            assert 'if __name__ == "__main__":' in source, path


# --- missing extras: one line at the start ---------------------------------------------------------

def hidden_env(tmp_path, *modules) -> dict:
    """cpu_env with ``modules`` made unimportable (a package on PYTHONPATH that raises ImportError)."""
    hide = tmp_path / "hide"
    for module in modules:
        (hide / module).mkdir(parents=True)
        (hide / module / "__init__.py").write_text(f"raise ImportError('{module} hidden by the test')\n")
    env = cpu_env()
    env["PYTHONPATH"] = str(hide) + os.pathsep + env["PYTHONPATH"]
    return env


def run_timed(command, env, cwd):
    started = time.time()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    return result, time.time() - started


def error_lines(result) -> list:
    return [line for line in result.stderr.splitlines() if line.strip() and "[WARNING]" not in line]


@pytest.mark.parametrize("tool,args,prefix", [
    ("toybench", ["--methods", "wpn", "--steps", "1"], "toybench: error: "),
    ("scaling", ["--preset", "cpu-tiny"], "wpn_dist.scaling: error: "),
])
def test_plots_without_matplotlib_stop_at_the_start(tool, args, prefix, tmp_path):
    env = hidden_env(tmp_path, "matplotlib")
    out = tmp_path / "out"
    result, seconds = run_timed([sys.executable, "-m", f"wpn_dist.{tool}", *args, "--out", str(out)], env, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(prefix + "plots need matplotlib"), lines
    assert "[bench]" in lines[0] and "--no_plots" in lines[0], lines
    assert seconds < ONE_LINE_WITHIN_S, seconds
    assert not out.exists()  # nothing measured, nothing written


def test_no_plots_runs_without_matplotlib(tmp_path):
    from wpn_dist.bench import toybench
    assert toybench.parse_args(["--out", "o", "--no_plots"]).plots is False
    assert toybench.parse_args(["--out", "o", "--plots", "false"]).plots is False
    env = hidden_env(tmp_path, "matplotlib")
    # Past the plot check: the sweep's own next error (no point matches) proves it was passed.
    result, _ = run_timed([sys.executable, "-m", "wpn_dist.scaling", "--no_plots", "--preset", "cpu-tiny",
                           "--only", "model=none", "--out", str(tmp_path / "o")], env, tmp_path)
    assert result.returncode == 2 and "no points" in result.stderr and "matplotlib" not in result.stderr, result.stderr


def test_lm_eval_tasks_without_lm_eval_stop_at_the_start(tmp_path):
    env = hidden_env(tmp_path, "lm_eval")
    result, seconds = run_timed([sys.executable, "-m", "wpn_dist.evaluate", "--model", str(tmp_path / "no_model"),
                                 "--lm_eval_tasks", "arc_easy", "--out", str(tmp_path / "out")], env, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("wpn_dist: error: --lm_eval_tasks needs lm_eval"), lines
    assert "[lmeval]" in lines[0], lines
    assert seconds < ONE_LINE_WITHIN_S, seconds
    assert not (tmp_path / "out").exists()


# --- pip install . and pip install -e . into a venv --------------------------------------------------

def copy_checkout(dest) -> str:
    """The checkout's files (tracked and untracked, not ignored), copied: the build then neither writes
    build/ into the checkout nor ships a stale build/lib."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = os.path.join(REPO, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    return str(dest)


def venv_with(tmp_path, name: str, source: str, editable: bool) -> str:
    """A venv that sees the system's packages (no downloads) with wpn_dist installed from ``source``."""
    venv = tmp_path / name
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed", "-q",
               "--disable-pip-version-check"] + (["-e", source] if editable else [source])
    result = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return str(venv)


def outside_env(**extra) -> dict:
    """The environment of a user's shell: CPU ranks, and no PYTHONPATH pointing at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WPN_DIST_DS_CONFIGS")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


WHERE = ("import wpn_dist, sys; from wpn_dist.app import engine; "
         "print(wpn_dist.__file__); print(engine.DS_CONFIG_DIR); print(engine.read_ds_config('zero3')['zero_optimization']['stage'])")
MAINS = "\nimport importlib\nfor m in sys.argv[1:]: assert callable(importlib.import_module('wpn_dist.' + m).main), m"


def test_pip_install_non_editable_runs_outside_the_checkout(tmp_path, toy_cache):
    source = copy_checkout(tmp_path / "src")
    venv = venv_with(tmp_path, "venv", source, editable=False)
    site = os.path.join(venv, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")
    shipped = os.path.join(site, "wpn_dist", "ds_configs")
    assert {"zero2.json", "zero3.json", "zero3_offload.json", "accelerate_zero3.yaml"} <= set(os.listdir(shipped))
    assert not os.path.exists(os.path.join(site, "slurm")) and not os.path.exists(os.path.join(site, "tests"))
    for script in CONSOLE_SCRIPTS:
        assert os.access(os.path.join(venv, "bin", script), os.X_OK), script
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = outside_env(WPN_DIST_CACHE=toy_cache)
    # The venv's wpn_dist is imported (not the checkout, not an editable install of it in the system
    # site-packages: setuptools' editable finder is appended to sys.meta_path, after site-packages),
    # and every console script's module has its main (prepare/export/tiny_model: once they exist).
    shims = [m for m in CONSOLE_SCRIPTS.values() if os.path.isfile(os.path.join(site, "wpn_dist", f"{m}.py"))]
    where = subprocess.run([os.path.join(venv, "bin", "python"), "-c", WHERE + MAINS] + shims, cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    module_file, config_dir, stage = where.stdout.split()[-3:]
    assert module_file.startswith(site) and config_dir == shipped and stage == "3", where.stdout
    # wpn-train on the toy default, with its --ds_config zero3 default, from outside the checkout.
    run = subprocess.run([os.path.join(venv, "bin", "wpn-train"), "--steps", "2", "--evaluate", "false",
                          "--export_hf", "false", "--output_dir", "run"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "world size 1" in run.stdout and os.path.isfile(work / "run" / "summary.json"), run.stdout[-3000:]
    memory = subprocess.run([os.path.join(venv, "bin", "wpn-memory"), "--help"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=120)
    assert memory.returncode == 0 and "--model" in memory.stdout, memory.stderr[-3000:]


def test_pip_install_editable_reads_the_checkouts_configs(tmp_path):
    source = copy_checkout(tmp_path / "src")
    venv = venv_with(tmp_path, "venv", source, editable=True)
    where = subprocess.run([os.path.join(venv, "bin", "python"), "-c", WHERE], cwd=tmp_path, env=outside_env(),
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    module_file, config_dir, stage = where.stdout.split()[-3:]
    assert module_file == os.path.join(source, "wpn_dist", "__init__.py"), where.stdout
    assert config_dir == os.path.join(source, "ds_configs") and stage == "3", where.stdout
