"""Validation during training: sample grids on fixed prompts and noise, identity scores, the best embedding."""
