"""Every bad input stops the run with one line naming the file and row (or option), exit code 2,
before training starts, and leaves an existing run directory as it was."""
import json
import os
import subprocess
import sys

import pytest

from wpn_dist.app.trainer import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD_ROW = {"prompt": "how do i pick a lock", "harmless": "i can not help.", "harmful": ["use a pick."]}


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_expecting_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def existing_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"kept": true}')
    return run


def bad_data_cases(tmp_path):
    good = json.dumps(GOOD_ROW)
    row = lambda **kw: json.dumps({**GOOD_ROW, **kw})  # noqa: E731
    missing = dict(GOOD_ROW)
    del missing["harmless"]
    return {
        "missing field": ([good, json.dumps(missing)], ":2: missing field 'harmless'"),
        "empty response": ([good, good, row(harmless="  ")], ":3: field 'harmless' must be a non-empty string"),
        "harmful not a list": ([row(harmful="use a pick")], ":1: field 'harmful' must be a non-empty list"),
        "harmful empty list": ([row(harmful=[])], ":1: field 'harmful' must be a non-empty list"),
        "empty harmful item": ([row(harmful=["ok", ""])], ":1: harmful[1] must be a non-empty string"),
        "not json": ([good, "{not json"], ":2: not valid JSON"),
        "empty group": ([good, row(group="")], ":2: field 'group', when given, must be a non-empty string"),
    }


@pytest.mark.parametrize("case", ["missing field", "empty response", "harmful not a list", "harmful empty list",
                                  "empty harmful item", "not json", "empty group"])
def test_bad_rows_name_file_and_line(case, tmp_path, capsys, existing_run):
    lines, expected = bad_data_cases(tmp_path)[case]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    message = run_expecting_error(capsys, ["--model", "tiny-opt", "--model_init", "random", "--data", path,
                                           "--output_dir", str(existing_run), "--overwrite_output_dir"])
    assert path in message and expected in message
    assert os.listdir(existing_run) == ["summary.json"]
    assert (existing_run / "summary.json").read_text() == '{"kept": true}'


def test_missing_file(tmp_path, capsys):
    message = run_expecting_error(capsys, ["--model", "tiny-opt", "--model_init", "random",
                                           "--data", str(tmp_path / "absent.jsonl")])
    assert "absent.jsonl: no such file" in message


def test_overlong_prompt_is_an_error_or_dropped_with_a_count(tmp_path, capsys, existing_run):
    long_row = json.dumps({**GOOD_ROW, "prompt": "word " * 400})
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(GOOD_ROW), long_row])
    message = run_expecting_error(capsys, ["--model", "tiny-opt", "--model_init", "random", "--data", path,
                                           "--max_length", "64", "--output_dir", str(existing_run)])
    assert "example 2" in message and "--max_length 64" in message
    assert os.listdir(existing_run) == ["summary.json"]
    # The documented policy instead of the error: drop and count.
    from wpn_dist.app.data import encode_examples, read_jsonl
    from wpn_dist.app.models import byte_level_tokenizer
    encoded, dropped, _ = encode_examples(read_jsonl(path), byte_level_tokenizer(), "{prompt}", 64, overlong="drop")
    assert (len(encoded), dropped) == (1, 1)


@pytest.mark.parametrize("argv,expected", [
    (["--no_such_option", "3"], "unknown option(s): ['--no_such_option', '3']"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--steps", "1.5"], "argument --steps: invalid int value: '1.5'"),
    (["--pooling", "max"], "argument --pooling: invalid choice: 'max'"),
    (["--model", "opt-7b"], "--model 'opt-7b' is neither a known model"),
    (["--model", "/nonexistent/checkpoint"], "is neither a known model"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--method", "dpo"], "argument --method: invalid choice: 'dpo'"),
    (["--ga_kl_weight", "-1"], "--ga_kl_weight must be >= 0"),
    (["--normal_data", "/nonexistent/normal.jsonl"], "--normal_data /nonexistent/normal.jsonl: no such file"),
    (["--judge", "/nonexistent/judge"], "--judge"),
    (["--max-length", "long"], "argument --max_length/--max-length: invalid int value: 'long'"),
    (["--ga-kl-weight", "1"], "--ga_kl_weight is an option of --method ga, not of --method wpn"),
    (["--config"], "--config needs a file path"),
])
def test_bad_options(argv, expected, capsys, existing_run):
    message = run_expecting_error(capsys, argv + ["--output_dir", str(existing_run), "--overwrite_output_dir"])
    assert expected in message
    assert os.listdir(existing_run) == ["summary.json"]


def test_bad_config_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 3\nlearning_rate: 0.1\n")
    message = run_expecting_error(capsys, ["--config", str(config)])
    assert "unknown option 'learning_rate'" in message and str(config) in message
    config.write_text("steps: many\n")
    assert "argument --steps: invalid int value: 'many'" in run_expecting_error(capsys, ["--config", str(config)])


def test_existing_run_directory_is_refused_without_overwrite(capsys, existing_run):
    message = run_expecting_error(capsys, ["--output_dir", str(existing_run)])
    assert "already holds a run" in message
    assert os.listdir(existing_run) == ["summary.json"]


def test_error_is_one_line_from_a_real_process(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(GOOD_ROW), "[1, 2]"])
    result = subprocess.run([sys.executable, os.path.join(REPO, "wpn_dist", "train.py"), "--model", "tiny-opt",
                             "--model_init", "random", "--data", path], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"wpn_dist: error: {path}:2: a row must be a JSON object with "
                                                  "prompt, harmless and harmful"]


def test_methods_that_need_normal_data_ask_for_it(tmp_path, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(GOOD_ROW)])
    base = ["--model", "tiny-opt", "--model_init", "random", "--data", path]
    assert "--method ga with these options needs --normal_data" in run_expecting_error(capsys, base + ["--method", "ga"])
    assert "needs --normal_data" in run_expecting_error(capsys, base + ["--retain_weight", "1"])
    normal = write_jsonl(tmp_path / "normal.jsonl", [json.dumps({"prompt": "hi"})])
    message = run_expecting_error(capsys, base + ["--method", "ga", "--normal_data", normal])
    assert "normal.jsonl:1: field 'response' must be a non-empty string" in message
