"""Supervised training on hard labels alone: teacher fine-tuning and the labels-only student baseline."""

from kdjax.methods.base import Method, Stage, Term, register


@register("supervised", "Supervised training on hard labels only (fine-tune a teacher; labels-only baseline)")
def supervised(*, label_smoothing: float = 0.0, student_init="first") -> Method:
    """CE(labels) alone. The run still names a teacher (the model to start from); its forward pass is not
    read by any term, so XLA removes it from the compiled step."""
    if label_smoothing:
        raise ValueError("label_smoothing is not supported yet; use 0.0")
    term = Term.make("cross_entropy", "labels", name="ce")
    return Method("supervised", (Stage("supervised", (term,)),), description="hard-label cross-entropy",
                  student_init=student_init)
