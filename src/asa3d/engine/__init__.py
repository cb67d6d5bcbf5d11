"""One training loop for every method: phases, AMP, DDP through torchrun, EMA hooks, checkpoints."""
