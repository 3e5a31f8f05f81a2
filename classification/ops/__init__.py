"""Ops shared by the model families. Every op comes with a plain-PyTorch ``*_ref`` twin of the same signature."""
