"""One option system for every command line (wpn_dist.app.options): train, evaluate, toybench, scaling and
memory each take ``--config FILE`` (YAML/JSON) under the command line, list it in --help, refuse an unknown
option with one line, and still parse every invocation the documentation shows. In-process and fast; one
subprocess per tool for the exit status."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, cpu_env
from wpn_dist.app.config import parse_config
from wpn_dist.app.evaluation import parse_evaluate_options
from wpn_dist.app.options import OptionError, parse_options
from wpn_dist.bench import memory, toybench
from wpn_dist.bench.scaling import study


def train_value(argv, name):
    config = parse_config(argv)
    return next(getattr(part, name) for part in (config.model, config.data, config.method, config.train, config.eval,
                                                 config.method_options) if hasattr(part, name))


# tool -> (parse(argv) -> options, options it needs, an option: (value in the file, value on the command line))
TOOLS = {
    "train": (parse_config, {}, ("steps", 7, 9)),
    "evaluate": (parse_evaluate_options, {"model": "runs/x/hf"}, ("max_new_tokens", 5, 6)),
    "toybench": (toybench.parse_args, {"out": "bench"}, ("ranks", 3, 4)),
    "scaling": (study.parse_args, {"out": "study"}, ("gpus_per_node", 4, 2)),
    "memory": (memory.parse_args, {"model": "opt-1.3b"}, ("seq_len", 512, 256)),
}


def value(tool, argv, name):
    parse = TOOLS[tool][0]
    return train_value(argv, name) if tool == "train" else getattr(parse(argv), name)


def write_yaml(path, mapping):
    path.write_text(yaml.safe_dump(mapping))
    return str(path)


@pytest.mark.parametrize("tool", list(TOOLS))
def test_config_file_under_the_command_line(tool, tmp_path):
    _, needed, (name, in_file, on_line) = TOOLS[tool]
    path = write_yaml(tmp_path / f"{tool}.yaml", {**needed, name: in_file})
    assert value(tool, ["--config", path], name) == in_file
    assert value(tool, [f"--config={path}"], name) == in_file
    assert value(tool, ["--config", path, f"--{name}", str(on_line)], name) == on_line
    assert value(tool, [f"--{name}", str(on_line), "--config", path], name) == on_line  # wherever --config is
    # JSON works the same.
    json_path = tmp_path / f"{tool}.json"
    json_path.write_text(json.dumps({**needed, name: in_file}))
    assert value(tool, ["--config", str(json_path)], name) == in_file


@pytest.mark.parametrize("tool", list(TOOLS))
def test_unknown_key_in_the_file_is_one_error_line(tool, tmp_path):
    parse, needed, _ = TOOLS[tool]
    path = write_yaml(tmp_path / "bad.yaml", {**needed, "no_such_option": 1})
    with pytest.raises(OptionError) as error:
        parse(["--config", path])
    message = str(error.value)
    assert "unknown option 'no_such_option'" in message and path in message and "\n" not in message
    with pytest.raises(OptionError, match="no such file"):
        parse(["--config", str(tmp_path / "absent.yaml")])
    with pytest.raises(OptionError, match=r"unknown option\(s\)"):
        parse([f"--{k}={v}" for k, v in needed.items()] + ["--no_such_option", "1"])


@pytest.mark.parametrize("tool", list(TOOLS))
def test_help_lists_config(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TOOLS[tool][0](["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config FILE" in out and "usage:" in out
    assert "(default: )" not in " ".join(out.split()), "an empty default is shown"


TOOL_COMMANDS = {  # the command line, the required options, the first words of its one error line
    "evaluate": ([sys.executable, "-m", "wpn_dist.evaluate"], {"model": "m"}, "wpn_dist: error: "),
    "toybench": ([sys.executable, "-m", "wpn_dist.toybench"], {"out": "o"}, "toybench: error: "),
    "scaling": ([sys.executable, "-m", "wpn_dist.scaling"], {"out": "o"}, "wpn_dist.scaling: error: "),
    "memory": ([sys.executable, "-m", "wpn_dist.memory"], {"model": "opt-1.3b"}, "error: "),
}


@pytest.mark.parametrize("tool", list(TOOL_COMMANDS))
def test_a_bad_config_exits_2_with_one_line(tool, tmp_path):
    command, needed, prefix = TOOL_COMMANDS[tool]
    path = write_yaml(tmp_path / "bad.yaml", {**needed, "no_such_option": 1})
    result = subprocess.run(command + [f"--config={path}"], cwd=tmp_path, env=cpu_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"{prefix}--config {path}: unknown option 'no_such_option'"], lines
    assert result.stdout == ""
    assert not (tmp_path / "o").exists()


# --- values from a file ----------------------------------------------------------------------------

def test_bools_lists_and_hyphens(tmp_path):
    # Flags: given alone, with a value, from a file; the command line wins.
    path = write_yaml(tmp_path / "t.yaml", {"out": "b", "ablation": True, "methods": ["wpn", "ga"],
                                            "train_args": "--evaluate_before"})
    options = toybench.parse_args(["--config", path])
    assert options.ablation is True and options.methods == "wpn,ga" and options.method_list == ["wpn", "ga"]
    assert options.train_args == "--evaluate_before"  # a value that starts with '-'
    assert toybench.parse_args(["--config", path, "--ablation", "false"]).ablation is False
    assert toybench.parse_args(["--out", "b", "--ablation"]).ablation is True
    assert toybench.parse_args(["--out", "b"]).ablation is False
    with pytest.raises(OptionError, match=r"unknown method\(s\) xx"):
        toybench.parse_args(["--out", "b", "--methods", "wpn,xx"])
    rows = toybench.parse_args(["--out", "b", "--ablation_rows", "wpn npair only, sft recovery_cuts=3 prompt_noise=0.4"])
    assert rows.ablation_row_list == ["wpn npair only", "sft recovery_cuts=3 prompt_noise=0.4"]
    with pytest.raises(OptionError, match=r"unknown row\(s\) wpn lr=7"):
        toybench.parse_args(["--out", "b", "--ablation_rows", "wpn lr=7"])
    # A list option: a YAML list in the file; on the command line it replaces the file's list.
    path = write_yaml(tmp_path / "s.yaml", {"out": "o", "preset": ["cpu-tiny", "toy-unlearn"], "list": True})
    assert study.parse_args(["--config", path]).preset == ["cpu-tiny", "toy-unlearn"]
    assert study.parse_args(["--config", path, "--preset", "gpu-sizes"]).preset == ["gpu-sizes"]
    assert study.parse_args(["--config", path]).list is True
    # Keys and options spelled with hyphens are the underscore options.
    path = write_yaml(tmp_path / "m.yaml", {"model": "opt-1.3b", "gpus-per-node": 4, "zero-init": False})
    options = memory.parse_args(["--config", path])
    assert options.gpus_per_node == 4 and options.zero_init is False
    assert memory.parse_args(["--config", path, "--gpus-per-node", "2"]).gpus_per_node == 2
    _, given = parse_options((memory.MemoryOptions,), ["--model", "m", "--gpus-per-node", "2"])
    assert given == {"model", "gpus_per_node"}


def test_train_method_options_keep_their_checks(tmp_path):
    # An option of another method is refused however it is spelled or wherever it is given.
    with pytest.raises(OptionError, match="--ga_kl_weight is an option of --method ga"):
        parse_config(["--ga-kl-weight", "1"])
    path = write_yaml(tmp_path / "run.yaml", {"method": "wpn", "ga_kl_weight": 1})
    with pytest.raises(OptionError, match="--ga_kl_weight is an option of --method ga"):
        parse_config(["--config", path])
    assert train_value(["--config", path, "--method", "ga"], "ga_kl_weight") == 1


def test_evaluate_defaults_are_the_trainers():
    from wpn_dist.app.data import PROMPT_FORMAT, TOY_MAX_LENGTH
    options = parse_evaluate_options(["--model", "m"])
    run = parse_config([])
    assert options.prompt_format == PROMPT_FORMAT == run.data.prompt_format
    assert (options.judge, options.max_new_tokens, options.batch_size, options.max_length) == \
        (run.eval.judge, run.eval.max_new_tokens, run.eval.eval_batch_size, TOY_MAX_LENGTH)
    assert run.data.max_length is None  # the trainer's follows from the data (the toy world's is TOY_CONTEXT)
    assert parse_evaluate_options(["--model", "m", "--zero3", "--local_rank=1"]).zero3 is True


# --- every documented invocation still parses ------------------------------------------------------

DOCUMENTED = ["README.md", "docs", "slurm", "scripts", "wpn_dist"]
INVOCATION = re.compile(r"(?:-m|--module)\s+wpn_dist\.(evaluate|toybench|scaling|memory)\b(.*)")
PARSERS = {"evaluate": (parse_evaluate_options, "--model"), "toybench": (toybench.parse_args, "--out"),
           "scaling": (study.parse_args, "--out"), "memory": (memory.parse_args, "--model")}
PLACEHOLDERS = {'"$@"': "", "[options]": "", "<options>": ""}  # in the text
VALUES = {"<n>": "2", "N": "64", "S": "60"}  # words standing for a value


def documented_invocations() -> list:
    found = []
    for entry in DOCUMENTED:
        root = os.path.join(REPO, entry)
        paths = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, files in os.walk(root)
                                                     for f in files if f.endswith((".md", ".sh", ".py"))]
        for path in sorted(paths):
            with open(path, encoding="utf-8") as f:
                text = re.sub(r"\\+\n", " ", f.read())  # continued lines (a docstring writes \\)
            for line in text.splitlines():
                for match in INVOCATION.finditer(line):
                    rest = match.group(2)
                    for placeholder, replacement in PLACEHOLDERS.items():
                        rest = rest.replace(placeholder, replacement)
                    rest = re.split(r"`|\s#|\)\.|\);|\)$|\"", rest)[0]  # the end of the command
                    words = [VALUES.get(w, w) for w in shlex.split(rest.replace("[", " ").replace("]", " "))]
                    if words and words[-1] == "...":
                        words = words[:-1]
                    if "--help" in words:
                        continue
                    found.append((os.path.relpath(path, REPO), match.group(1), words))
    return found


def test_every_documented_invocation_parses():
    invocations = documented_invocations()
    assert {tool for _, tool, _ in invocations} == set(PARSERS)
    assert sum(1 for _, _, words in invocations if words) >= 15  # the examples of README, docs and slurm
    for where, tool, words in invocations:
        parse, required = PARSERS[tool]
        if required not in words:  # a mention in prose, not a whole command
            words = words + [required, "x"]
        try:
            parse(words)
        except OptionError as e:
            pytest.fail(f"{where}: python -m wpn_dist.{tool} {' '.join(words)}: {e}")
