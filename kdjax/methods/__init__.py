"""Distillation methods as data; each recipe file registers its named methods."""
from kdjax.methods.base import (ChainModel, Method, MethodError, Module, Stage, Term, build_method, combine, get_method,
                                known_methods, register)

__all__ = ["ChainModel", "Method", "MethodError", "Module", "Stage", "Term", "build_method", "combine", "get_method",
           "known_methods", "register"]
