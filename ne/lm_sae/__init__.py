"""Sparse autoencoders on a language model's activations: settings, architectures and losses, the shuffling
activation buffer, the training loop and the evaluation (no Ray: `jobs/lm_sae.py` runs them on Ray Train)."""
