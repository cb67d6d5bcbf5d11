"""Backbone wrapper (MONAI SwinUNETR with encoder taps), heads and EMA helpers."""
