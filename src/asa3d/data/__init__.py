"""Data layer: readers + validation, datalists and presets, canonical preprocessing + cache, phantom."""
