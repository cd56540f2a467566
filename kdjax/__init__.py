"""kdjax: knowledge distillation of transformer language models in JAX/Flax NNX.

The public names below are imported on first use, so `python -m kdjax.main` can check its config,
workdir and inputs (and refuse bad ones) before jax is imported.
"""

import importlib

from kdjax.host_memory import reuse_host_memory

__version__ = "0.1.0"

# Before jax starts its worker threads: freed step buffers are reused instead of re-mapped (host_memory).
reuse_host_memory()

_LAZY = {
    "CheckpointError": "kdjax.hub", "Model": "kdjax.hub", "load_pretrained": "kdjax.hub",
    "save_pretrained": "kdjax.hub", "ModelConfig": "kdjax.models", "TapSpec": "kdjax.models",
    "preset": "kdjax.models", "student_from": "kdjax.students",
    "generate": "kdjax.generation", "generate_fn": "kdjax.generation", "GenerateOutput": "kdjax.generation",
}

__all__ = ["CheckpointError", "GenerateOutput", "Model", "ModelConfig", "TapSpec", "generate", "generate_fn",
           "load_pretrained", "preset", "save_pretrained", "student_from", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdjax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
