"""Flax Linen modules. They speak logical axis names only (see `parallel/rules.py`)."""
