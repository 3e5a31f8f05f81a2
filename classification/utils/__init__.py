"""Utilities: checkpoints, distributed helpers, logging, FLOP counting. Imports torch only."""
