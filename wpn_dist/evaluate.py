"""Command line: ``python -m wpn_dist.evaluate``, installed also ``wpn-evaluate``
(wpn_dist/app/evaluation.py)."""


def main() -> None:
    from wpn_dist.app.distributed import exit_now
    from wpn_dist.app.evaluation import main as evaluate
    evaluate()
    exit_now()  # as wpn_dist/train.py: no interpreter teardown after the process group is left


if __name__ == "__main__":
    main()
