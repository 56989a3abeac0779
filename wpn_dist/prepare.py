"""Command line: ``python -m wpn_dist.prepare`` (wpn_dist/app/prepare.py): on the login node, fetch the
model and data into a shared cache, build the DeepSpeed ops and print the disk a run needs."""
import sys

from wpn_dist.app.prepare import main as _main


def main() -> None:
    sys.exit(_main())


if __name__ == "__main__":
    main()
