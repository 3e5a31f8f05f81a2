"""Installs the pure-Python `classification` package. The selective-scan kernels have their own setup.py."""
from setuptools import find_packages, setup

setup(
    name="defmamba",
    version="0.1.0",
    description="Deformable vision state-space models (DefMamba, DAMamba): training, evaluation, kernels",
    packages=find_packages(include=["classification", "classification.*"]),
    python_requires=">=3.10",
)
