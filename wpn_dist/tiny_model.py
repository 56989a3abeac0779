"""Command line: ``python -m wpn_dist.tiny_model --out DIR``, installed also ``wpn-tiny-model``
(wpn_dist/bench/tiny_model.py)."""
import sys


def main() -> None:
    from wpn_dist.bench.tiny_model import main as tiny_model
    sys.exit(tiny_model())


if __name__ == "__main__":
    main()
