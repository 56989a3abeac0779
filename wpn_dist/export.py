"""Command line: ``deepspeed --module wpn_dist.export RUN_DIR [--out DIR] [--dtype auto|bf16|fp16|fp32]
[--max_shard_size 5GB]`` (wpn_dist/app/export_run.py)."""


def main() -> None:
    from wpn_dist.app.distributed import exit_now
    from wpn_dist.app.export_run import main as export_main
    export_main()
    exit_now()  # as wpn_dist/train.py: a finished CPU rank can abort in the interpreter's teardown


if __name__ == "__main__":
    main()
