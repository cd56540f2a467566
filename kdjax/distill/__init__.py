"""The distillation engine: terms execution, the jitted step, multi-stage runs, the trainer."""
from kdjax.distill.run import Distillation
from kdjax.distill.step import TrainState, make_optimizer, metric_values

__all__ = ["Distillation", "TrainState", "make_optimizer", "metric_values"]
