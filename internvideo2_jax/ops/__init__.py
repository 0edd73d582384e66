"""Plain-JAX operations (no Flax): attention entry point and kernels, loss math."""
