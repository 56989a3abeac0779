"""Command line: ``python -m wpn_dist.scaling``, installed also ``wpn-scaling``
(wpn_dist/bench/scaling/study.py)."""


def main() -> None:
    from wpn_dist.bench.scaling.study import main as study
    study()


if __name__ == "__main__":
    main()
