"""DefMamba and DAMamba models, the model registry and checkpoint loading."""
from .checkpoint import CheckpointError, has_ema_weights, load_checkpoint, read_checkpoint, register_checkpoint_filter
from .registry import create_model, is_model, list_models, register_model
from .defmamba import DefMamba
from .damamba import DAMamba
from .build import build_model, resolve_model_config, with_variant_values
