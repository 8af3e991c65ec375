"""Running experiments: training and evaluation, tracking, checkpoints, sweeps,
search, comparison, benchmarks."""
