"""neuron-embeddings: find the distinct behaviours inside polysemantic neurons."""

__version__ = "0.1.0"
