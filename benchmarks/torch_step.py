"""The KD step of a kdjax run written in PyTorch eager: the reference `benchmarks/step.py` compares against.

`TorchKDStep(run)` rebuilds the run's stage in PyTorch: teacher and student are the run's own models,
exported with `kdjax.save_pretrained` and loaded as `transformers` BERT encoders (no download), the
loss is the stage's terms written here in torch (hidden-state MSE and MiniLMv2 Q/K/V relations, the
kinds of the quickstart), and the update is `torch.optim.AdamW` with the run's learning-rate schedule,
gradient clipping and weight decay on matrices only. One `step(batch)` is what a hand-written PyTorch
training loop does per batch: teacher forward under `no_grad`, student forward, loss, backward,
clip, update.

Like kdjax's step, the teacher runs only up to its last tapped layer and neither model computes its
pooler; Q/K/V are read with forward hooks on the tapped layers' projections only. Terms, models or
stages outside this scope are refused with a one-line `ValueError`.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Mapping, Optional

import numpy as np

SUPPORTED_KINDS = ("hidden_mse", "qkv_relation_kl")
SUPPORTED_MODELS = ("bert",)
MASK_VALUE = -1e30  # what kdjax's masked log-softmax puts on padded keys


def _torch():
    import torch
    return torch


# --------------------------------------------------------------------------------------------------
# The loss terms, written from their definitions (docs/methods.md) on torch tensors.


def hidden_mse(student, teacher, mask):
    """Mean over valid tokens of the per-token mean squared error over the feature axis."""
    torch = _torch()
    valid = mask.bool()[..., None]
    s = torch.where(valid, student.float(), 0.0)
    t = torch.where(valid, teacher.float(), 0.0)
    err = (s - t).square().mean(-1)
    m = mask.float()
    return (err * m).sum() / m.sum().clamp_min(1.0)


def relation_kl(student, teacher, mask, num_heads: int):
    """MiniLMv2 self-relation KL(R_T || R_S), R = softmax(X_a X_a^T / sqrt(d_r)) per relation head,
    summed over keys, averaged over relation heads and valid query rows."""
    torch = _torch()
    valid = mask.bool()
    b, s = mask.shape

    def log_relations(x):
        x = torch.where(valid[..., None], x.float(), 0.0)
        d_r = x.shape[-1] // num_heads
        x = x.reshape(b, s, num_heads, d_r).transpose(1, 2)
        scores = x @ x.transpose(-1, -2) / math.sqrt(d_r)
        scores = scores.masked_fill(~valid[:, None, None, :], MASK_VALUE)
        return torch.log_softmax(scores, dim=-1)

    log_s, log_t = log_relations(student), log_relations(teacher)
    p_t = log_t.exp()
    keep = (p_t > 0) & valid[:, None, None, :]
    kl = torch.where(keep, p_t * (log_t - log_s), 0.0).sum(-1)  # [B, A, S]
    rows = valid[:, None, :].float()
    return (kl * rows).sum() / (rows.sum() * num_heads).clamp_min(1.0)


def qkv_relation_kl(student_qkv, teacher_qkv, mask, num_relation_heads: int = 48):
    return sum(relation_kl(s, t, mask, num_relation_heads) for s, t in zip(student_qkv, teacher_qkv))


# --------------------------------------------------------------------------------------------------
# The step


class TorchKDStep:
    """The run's stage `stage` as a PyTorch eager training step (see the module docstring)."""

    def __init__(self, run, stage: int = 0, *, threads: Optional[int] = None):
        torch = _torch()
        from kdjax.distill import terms as terms_lib
        from kdjax.distill.run import _cfg_get, optimizer_settings

        if threads:
            torch.set_num_threads(int(threads))
        runner = run.runner(stage)
        if len(runner.teachers) != 1:
            raise ValueError(f"the PyTorch step has one teacher, the stage has {len(runner.teachers)}; "
                             "benchmark a single-teacher config")
        if runner.stage.loss is not None or runner.stage.modules or runner.stage.data_hook is not None:
            raise ValueError(f"stage {runner.stage.name!r} has its own loss, modules or data hook, which the PyTorch "
                             "step does not reimplement; benchmark a stage made of plain terms")
        if int(_cfg_get(run.train_cfg, "grad_accum", 1)) != 1:
            raise ValueError("the PyTorch step runs grad_accum=1; pass --config.train.grad_accum=1")
        teacher_spec = runner.teachers[0]
        teacher_model = run.teachers[teacher_spec.name][0]
        t_cfg, s_cfg = teacher_spec.config, runner.student_config
        for who, cfg in (("teacher", t_cfg), ("student", s_cfg)):
            if cfg.model_type not in SUPPORTED_MODELS:
                raise ValueError(f"the PyTorch step rebuilds BERT encoders, the {who} is {cfg.model_type!r}; "
                                 "benchmark a BERT-family config")
        self.terms = []
        for term in runner.stage.terms:
            if term.fn not in SUPPORTED_KINDS or term.source not in ("hidden_states", "qkv"):
                raise ValueError(f"term {term.name!r} ({term.fn}) has no PyTorch version here (supported: "
                                 f"{', '.join(SUPPORTED_KINDS)}); benchmark a config made of those")
            if terms_lib.needs_projection(term, s_cfg, t_cfg):
                raise ValueError(f"term {term.name!r} needs a learned width projection, which the PyTorch step "
                                 "does not build; keep the teacher's hidden size")
            self.terms.append((term, terms_lib.pairs_for(term, s_cfg, t_cfg)))
        self.total_steps = int(runner.steps)
        self.step_count = 0

        with tempfile.TemporaryDirectory() as tmp:
            self.teacher = self._load(teacher_model, os.path.join(tmp, "teacher"), t_cfg)
            self.student = self._load(run.student, os.path.join(tmp, "student"), s_cfg)
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.student.train()
        # The teacher runs up to its last tapped layer, as kdjax's truncated teacher pass does.
        t_taps = teacher_spec.taps.resolve(t_cfg.num_layers)
        depth = max([max(v, default=0) for k, v in t_taps.items() if k == "hidden_states"]
                    + [max(v, default=-1) + 1 for k, v in t_taps.items() if k in ("query", "key", "value")] + [0])
        self.teacher.encoder.layer = self.teacher.encoder.layer[:depth]
        self.captured: dict = {}
        self._hook(self.teacher, "teacher", t_taps)
        self._hook(self.student, "student", runner.student_taps.resolve(s_cfg.num_layers))

        opt = optimizer_settings(run.config)
        warmup = opt.warmup_steps or round(opt.warmup_ratio * self.total_steps)
        peak = float(runner.stage.learning_rate or opt.learning_rate)
        self.max_grad_norm = opt.max_grad_norm
        decay = [p for p in self.student.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.student.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=peak)
        from kdjax.distill.step import _learning_rate
        schedule = _learning_rate(peak, self.total_steps, int(warmup), opt.schedule)
        self.lr_table = np.asarray([float(schedule(i)) for i in range(self.total_steps + 1)])

    @staticmethod
    def _load(model, directory: str, cfg):
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        from kdjax import save_pretrained
        hf_logging.set_verbosity_error()  # the skipped pooler is reported as unexpected weights otherwise
        save_pretrained(model, directory)
        return BertModel.from_pretrained(directory, add_pooling_layer=False, attn_implementation="sdpa",
                                         hidden_dropout_prob=cfg.dropout,
                                         attention_probs_dropout_prob=cfg.attention_dropout)

    def _hook(self, model, who: str, taps: Mapping[str, tuple]):
        """Record the Q/K/V projections ([B, S, H*d], heads concatenated) of the tapped layers only."""
        for kind, attr in (("query", "query"), ("key", "key"), ("value", "value")):
            for layer in taps.get(kind, ()):
                module = getattr(model.encoder.layer[layer].attention.self, attr)

                def keep(_module, _inputs, output, key=(who, kind, layer)):
                    self.captured[key] = output
                module.register_forward_hook(keep)

    def loss(self, batch: Mapping[str, Any]):
        """The stage loss of one batch (a torch scalar with the student's graph attached)."""
        torch = _torch()
        from kdjax.knowledge.registry import schedule_value
        ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
        mask = torch.as_tensor(np.asarray(batch["attention_mask"]), dtype=torch.long)
        types = batch.get("token_type_ids")
        types = None if types is None else torch.as_tensor(np.asarray(types), dtype=torch.long)
        self.captured.clear()
        with torch.no_grad():
            t_hidden = self.teacher(input_ids=ids, attention_mask=mask, token_type_ids=types,
                                    output_hidden_states=True).hidden_states
        s_hidden = self.student(input_ids=ids, attention_mask=mask, token_type_ids=types,
                                output_hidden_states=True).hidden_states
        progress = min(self.step_count / max(self.total_steps, 1), 1.0)
        total = torch.zeros(())
        for term, pairs in self.terms:
            value = torch.zeros(())
            for i, j in pairs:
                if term.fn == "hidden_mse":
                    value = value + hidden_mse(s_hidden[i], t_hidden[j], mask)
                else:
                    s = [self.captured[("student", k, i)] for k in ("query", "key", "value")]
                    t = [self.captured[("teacher", k, j)] for k in ("query", "key", "value")]
                    value = value + qkv_relation_kl(s, t, mask, term.kwargs.get("num_relation_heads", 48))
            total = total + float(schedule_value(term.weight, progress)) * value
        return total

    def step(self, batch: Mapping[str, Any]) -> float:
        """One training step; returns the loss (before the update)."""
        torch = _torch()
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr_table[min(self.step_count, self.total_steps)])
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.step_count += 1
        return float(loss.detach())


def matmul_peak(n: int = 1024, repeats: int = 20, block: int = 5) -> dict:
    """Measured fp32 matmul throughput (GFLOP/s) of jax and torch on an `n x n` product.

    The best of `repeats` timings of each: what one core set can do at the moment of measurement, the
    denominator of a step's `fraction of matmul peak`. The frameworks take turns in blocks of `block`
    products, not product by product: PyTorch's OpenMP workers keep spinning for a while after an op, and
    a JAX product started in that window shares the cores with them (measured: 154 GFLOP/s interleaved
    product by product, 188 in blocks, on a 2-core machine).
    """
    import time

    import jax
    import jax.numpy as jnp
    torch = _torch()
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), np.float32)
    b_np = rng.standard_normal((n, n), np.float32)
    a_j, b_j = jnp.asarray(a_np), jnp.asarray(b_np)
    mm = jax.jit(jnp.matmul)
    mm(a_j, b_j).block_until_ready()
    a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
    torch.matmul(a_t, b_t)
    calls = {"jax": lambda: mm(a_j, b_j).block_until_ready(), "torch": lambda: torch.matmul(a_t, b_t)}
    best = {"jax": math.inf, "torch": math.inf}
    for _ in range(max(1, math.ceil(repeats / block))):
        for name, call in calls.items():
            for _ in range(block):
                t0 = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - t0)
    flops = 2.0 * n ** 3
    return {"n": n, "jax_gflops": flops / best["jax"] / 1e9, "torch_gflops": flops / best["torch"] / 1e9}
