"""Meshes, logical-axis rules and sharded initialisation. The only place that knows mesh axes."""
