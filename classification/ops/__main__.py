"""``python -m classification.ops``: prints which selective-scan backends this machine has and which one runs."""
import argparse

from .report import backend_report

if __name__ == "__main__":
    argparse.ArgumentParser(prog="python -m classification.ops", description=__doc__.split(": ", 1)[1]).parse_args()
    print("\n".join(backend_report()))
