"""Utilities: checkpoints, distributed helpers, logging, FLOP counting. They never import the models."""
