"""Input pipeline: sources, PyAV decoding and frame sampling, transforms, synthetic data."""
