"""One option system for every command line: dataclasses whose fields are the options (with a help
text each), parsed by transformers' HfArgumentParser.

Precedence: field defaults < a ``--config`` file (YAML or JSON; ``--config F`` or ``--config=F``)
< command-line options. Unknown options, in the file or on the command line, are errors; so are values
of the wrong type and values a dataclass's ``__post_init__`` refuses. Every error is one
``OptionError`` line naming the option.

Every option ``--a_b`` is also accepted as ``--a-b`` (HfArgumentParser adds that alias, from
transformers PR #33990, Oct. 2024; every version setup.py allows has it), and a config file's keys
may be written either way. A file's value for a list
field (``List[str]``) is a YAML list; a list given for any other field is joined with commas (the
comma-separated options). An option given on the command line replaces the file's value, lists too.
"""
import argparse
import json
import os
import sys
from dataclasses import fields
from typing import get_origin, get_type_hints

from transformers import HfArgumentParser


class OptionError(ValueError):
    """A bad option: the message names it."""


class _Parser(HfArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise OptionError(message)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's own line breaks (module docstrings) and shows each default,
    except a None or empty one, a required option's, or where the help text already speaks of it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, [], "") or action.required or "default" in text.lower() \
                or isinstance(action, argparse._StoreConstAction):  # --no_X: its default is X's
            return text
        return super()._get_help_string(action)


def _list_fields(classes: tuple) -> set:
    return {name for cls in classes for name, hint in get_type_hints(cls).items() if get_origin(hint) is list}


def _file_to_words(path: str, known: set, list_fields: set = frozenset(), skip: set = frozenset()) -> list:
    """The options of a YAML/JSON config file as command-line words, so the parser checks them.
    Options in ``skip`` (given on the command line) are left out."""
    if not os.path.isfile(path):
        raise OptionError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:
        raise OptionError(f"--config {path}: cannot parse ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise OptionError(f"--config {path}: must hold a mapping of option: value")
    words = []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise OptionError(f"--config {path}: unknown option '{key}'")
        if name in skip:
            continue
        if name in list_fields and isinstance(value, (list, tuple)):
            if value:
                words += [f"--{name}"] + [str(v) for v in value]
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        words.append(f"--{name}={value}")  # one word: a value may start with '-'
    return words


def _split_config(argv: list) -> tuple:
    """(config file path or None, the other words)."""
    path, rest, i = None, [], 0
    while i < len(argv):
        word = argv[i]
        if word == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise OptionError("--config needs a file path")
            path, i = argv[i + 1], i + 2
            continue
        if word.startswith("--config="):
            path = word.split("=", 1)[1]
        else:
            rest.append(word)
        i += 1
    return path, rest


def given_options(argv: list) -> set:
    """Names of the options written on a command line (``--name`` or ``--name=value``; ``--a-b`` is
    named ``a_b``)."""
    return {word[2:].split("=", 1)[0].replace("-", "_") for word in argv if word.startswith("--")}


def parse_options(classes: tuple, argv: list | None = None, prog: str | None = None,
                  description: str | None = None) -> tuple:
    """Parse ``argv`` (default: sys.argv[1:]) into one instance of each dataclass in ``classes``.
    Returns (instances, names of the options the user gave, in the file or on the command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known = {f.name for cls in classes for f in fields(cls) if f.init}
    path, words = _split_config(argv)
    file_words = _file_to_words(path, known, _list_fields(classes), given_options(words)) if path is not None else []
    parser = _Parser(classes, prog=prog, description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of option: value (also --config=FILE); "
                        "options on the command line override it.")
    try:
        parsed = parser.parse_args_into_dataclasses(args=file_words + words, look_for_args_file=False)
    except ValueError as e:  # unknown options, or a __post_init__ check
        message = str(e)
        if "not used by the HfArgumentParser" in message:
            message = "unknown option(s): " + message.split(":", 1)[1].strip()
        raise OptionError(message) from None
    # The --config entry is parsed into no dataclass: HfArgumentParser returns it as an extra namespace.
    instances = tuple(p for p in parsed if not p.__class__.__name__ == "Namespace")
    return instances, given_options(file_words + words)
