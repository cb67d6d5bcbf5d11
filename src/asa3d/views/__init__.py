"""Pretext view generators: pure, batched tensor functions that run on the training device."""
