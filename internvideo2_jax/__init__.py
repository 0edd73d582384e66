"""internvideo2_jax: InternVideo2-class video foundation models in JAX/Flax."""
