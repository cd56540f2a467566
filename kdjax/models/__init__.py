"""kdjax models: one NNX transformer family with declared taps."""
from kdjax.models.config import (ConfigError, ModelConfig, SUPPORTED_MODEL_TYPES, preset)
from kdjax.models.taps import (Intermediates, TAP_KINDS, TapError, TapSpec)
from kdjax.models.transformer import (ModelOutputs, Transformer, forward, init_model, split)

__all__ = ["ConfigError", "ModelConfig", "SUPPORTED_MODEL_TYPES", "preset", "Intermediates", "TAP_KINDS",
           "TapError", "TapSpec", "ModelOutputs", "Transformer", "forward", "init_model", "split"]
