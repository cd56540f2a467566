"""Activations take the shared logical layout on a mesh: the compiled KD step never all-gathers a
teacher or student intermediate that a loss reads (only weights are gathered, as FSDP intends)."""

import re

import jax
import numpy as np

from kdjax import preset
from kdjax import sharding as S
from kdjax.distill.sharded import sharded_step
from kdjax.methods.base import Method, Stage, Term
from kdjax.models import activations

B, SEQ, D_T, D_S = 8, 12, 40, 24


def _compiled_text():
    teacher = preset("llama", vocab_size=96, hidden_size=D_T, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, head="causal_lm")
    student = preset("llama", vocab_size=96, hidden_size=D_S, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=48, head="causal_lm")
    method = Method("probe", (Stage("s", (Term.make("hidden_mse", "hidden_states", layers=((1, 2),)),
                                          Term.make("divergence", "logits", temperature=2.0))),))
    mesh = S.make_mesh(S.MeshConfig(axes=("data", "fsdp", "tensor"), ici=(1, 4, 2), dcn=(1, 1, 1)))
    step = sharded_step(student, {"teacher": teacher}, method, mesh, student_rules=S.DEFAULT_STUDENT_RULES,
                        teacher_rules=S.DEFAULT_TEACHER_RULES, batch_shape=(B, SEQ), learning_rate=1e-3,
                        total_steps=10)
    return step.lower().compile().as_text()


def _gathers(hlo: str) -> list[tuple[tuple[int, ...], str]]:
    """(result shape, op_name) of every all-gather in the optimized HLO."""
    found = []
    for line in hlo.splitlines():
        if " all-gather(" in line or " all-gather-start(" in line:
            head = line.split("=", 1)[1].split("all-gather")[0]
            name = re.search(r'op_name="([^"]*)"', line)
            for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", head):
                found.append((tuple(int(d) for d in dims.split(",") if d), name.group(1) if name else ""))
    return found


def test_no_intermediate_a_loss_reads_is_all_gathered():
    """Every all-gather of a [B, S, ...] activation is the embedding lookup's own resharding (the word
    table is split over fsdp on its feature axis, so the looked-up rows are regrouped by batch once);
    no block output, tapped hidden state, attention tensor or logit is gathered."""
    gathers = _gathers(_compiled_text())
    assert gathers, "expected FSDP weight all-gathers in the compiled step"
    activations_gathered = [(s, n) for s, n in gathers if any(s[i:i + 2] == (B, SEQ) for i in range(len(s) - 1))]
    not_lookup = [(s, n) for s, n in activations_gathered if not n.endswith("_take)/gather")]
    assert not not_lookup, not_lookup
    assert len(activations_gathered) <= 2  # at most one lookup per model


def test_constraints_are_a_no_op_outside_a_mesh_context():
    x = np.ones((2, 3, 4), np.float32)
    assert activations.constrain(x) is x
    seen = []
    with activations.constraints(lambda v, names: seen.append(names) or v):
        activations.constrain(x)
    assert seen == [activations.RESIDUAL]
    assert activations.constrain(x) is x and jax.devices()
