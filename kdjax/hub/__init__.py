"""Hugging Face checkpoints in and out: configs, weight maps, loading, export."""
from kdjax.hub.api import Model, Output, abstract_model, flat_params, load_pretrained, params_from_flat, save_pretrained
from kdjax.hub.checkpoint import CheckpointError
from kdjax.hub.families import FAMILIES, config_from_hf, config_to_hf, family
from kdjax.hub.streaming import ReadStats, load_sharded

__all__ = ["Model", "Output", "abstract_model", "flat_params", "load_pretrained", "params_from_flat",
           "save_pretrained", "CheckpointError", "FAMILIES", "config_from_hf", "config_to_hf", "family", "ReadStats",
           "load_sharded"]
