"""kdjax: knowledge distillation of transformer language models in JAX/Flax NNX."""

from kdjax.generate import GenerateOutput, generate, generate_fn
from kdjax.hub import CheckpointError, Model, load_pretrained, save_pretrained
from kdjax.models import ModelConfig, TapSpec, preset
from kdjax.students import student_from

__version__ = "0.1.0"

__all__ = ["CheckpointError", "GenerateOutput", "Model", "ModelConfig", "TapSpec", "generate", "generate_fn",
           "load_pretrained", "preset", "save_pretrained", "student_from", "__version__"]
