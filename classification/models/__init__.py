"""DefMamba and DAMamba models, the model registry and checkpoint loading."""
