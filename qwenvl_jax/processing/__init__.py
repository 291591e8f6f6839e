"""Host pipeline: numpy + PIL + tokenizers, never jax."""
