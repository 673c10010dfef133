"""Sparse autoencoders on a language model's activations: settings, the shuffling activation buffer, the training
loop and the evaluation (the architectures and losses are pure maths, in `ne.compute.lm_sae`; no Ray here:
`jobs/lm_sae.py` runs training on Ray Train)."""
