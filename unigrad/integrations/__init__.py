"""Bridges to other training frameworks (each imports its framework lazily or only when used)."""
