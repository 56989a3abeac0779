"""Command line: ``python -m wpn_dist.memory``, installed also ``wpn-memory`` (wpn_dist/bench/memory.py)."""
import sys


def main() -> None:
    from wpn_dist.bench.memory import main as memory
    sys.exit(memory())


if __name__ == "__main__":
    main()
