"""The paper's MNIST experiment: data, the 784-64-10 MLP, its configuration, Tables 2-3 and Figure 5.

The SAE and its neuron-embedding loss are not MNIST-specific and live in `ne.compute.sae`.
"""
