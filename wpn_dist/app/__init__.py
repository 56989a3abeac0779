"""The application: options, data, models, the DeepSpeed engine, the trainer, checkpoints, export
and evaluation. Built on the library (``wpn_dist.core``); never imports the benchmarks."""
