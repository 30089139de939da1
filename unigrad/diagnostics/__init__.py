"""Diagnostics: per-task gradients, learning gain (and, later, mismatch and stability monitors)."""
