"""Stage 2, training: the Trainer (trainer: build, fit, update, validate, save) and what it is made of:
the data it is fed (feed), token batches (batching, prefetch), the loss, the learning-rate schedule, the
optimizer (optim), DDP and torch.compile (distributed, compile), the progress and metrics log (progress,
metrics_log), validation, stopping, one run per directory (run_dir), the rules for resuming with a
changed config (resume), TensorBoard (board), curves (plot), the end of a run (finish) and checkpoint
averaging (average); and comparing finished runs (compare)."""
