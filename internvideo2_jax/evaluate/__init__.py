"""Evaluation and serving jobs: feature extraction, zero-shot retrieval and classification."""
