"""A tiny random-init model saved to disk, to stand in for a pretrained one in tests and trial runs:

    python -m wpn_dist.tiny_model --out DIR [--family opt|gpt-neo] [--seed 0]

It builds the ``tiny-opt`` (or ``tiny-gpt-neo``) spec of wpn_dist.app.models with the byte-level
tokenizer, exactly as ``--model tiny-opt --model_init random`` does, and saves both with
``save_pretrained`` (safetensors) into DIR. ``--model DIR`` then loads it as a pretrained model: the
path a real checkpoint takes (``from_pretrained``, its own tokenizer files, ZeRO-3 partitioning while
loading), with no download. Seconds on a CPU; about 1 MB.
"""
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from ..app.options import OptionError, parse_options


@dataclass
class TinyModelOptions:
    """The options of ``python -m wpn_dist.tiny_model``."""
    out: str = field(metadata={"help": "Directory to save the model and tokenizer in (created; files in it "
                                       "are replaced)."})
    family: Literal["opt", "gpt-neo"] = field(default="opt", metadata={
        "help": "The spec: tiny-opt or tiny-gpt-neo (wpn_dist.app.models.MODEL_SPECS)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights."})

    def __post_init__(self):
        if not self.out:
            raise OptionError("--out must name a directory")


def save_tiny_model(out: str, family: str = "opt", seed: int = 0) -> str:
    """Build the tiny spec of ``family`` with random weights and save it with its tokenizer in ``out``;
    returns ``out``."""
    from ..app.models import MODEL_SPECS, byte_level_tokenizer, load_model
    spec = MODEL_SPECS[f"tiny-{family}"]
    tokenizer = byte_level_tokenizer()
    # load_model's random init: the spec's config with the tokenizer's vocabulary and special ids, seeded.
    model = load_model(spec.name, tokenizer, init="random", seed=seed)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def parse_args(argv=None) -> TinyModelOptions:
    """defaults < --config file < command line; raises OptionError (one line) on a bad option."""
    (options,), _ = parse_options((TinyModelOptions,), argv, prog="python -m wpn_dist.tiny_model",
                                  description=__doc__)
    return options


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as e:  # OptionError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out = save_tiny_model(args.out, args.family, args.seed)
    except OSError as e:
        print(f"error: --out {args.out}: {e}", file=sys.stderr)
        return 2
    print(f"saved tiny-{args.family} (seed {args.seed}) to {out}: use --model {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
