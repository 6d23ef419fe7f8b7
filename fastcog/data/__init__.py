"""Datasets, decoding and the latent/embedding cache."""
