"""The environment a notebook's kernel runs in under the tests (the kernel inherits os.environ)."""

import os
import sys


def set_kernel_env(monkeypatch, **settings) -> None:
    """Shrink a notebook run through its `KDJAX_NOTEBOOK_<NAME>` overrides and run it on one CPU device,
    offline, with this interpreter (jupyter_client maps the kernel spec's "python" to sys.executable)."""
    for name, value in settings.items():
        monkeypatch.setenv(f"KDJAX_NOTEBOOK_{name.upper()}", str(value))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
