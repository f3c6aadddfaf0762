"""Orientations, sampling grids, translations and point-group symmetry."""
