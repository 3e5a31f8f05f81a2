"""``python -m classification.ops``: prints which selective-scan backends this machine has and which one runs."""
from .report import backend_report

if __name__ == "__main__":
    print("\n".join(backend_report()))
