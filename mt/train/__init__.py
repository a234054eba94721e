"""Stage 2, training: the Trainer (trainer) and what it is made of: token batches (batching, prefetch),
the loss, the learning-rate schedule, DDP (distributed), TensorBoard (board), curves (plot), checkpoint
averaging (average); and comparing finished runs (compare)."""
