"""The toy world's development tooling: its concepts, pixel metrics, and the base model's training and evaluation.

The renderer and the model loader the nodes need ship in ``dci.toyworld``; everything here is for building and
measuring the toy model, the benchmarks and the tests.
"""
