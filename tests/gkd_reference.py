"""NumPy float64 helpers shared by the GKD method tests (independent of the methods' own code)."""

import ml_collections
import numpy as np

from kdjax.models.transformer import forward


def config(method, method_args=None, steps=4, batch=8, max_length=16, student_layers=2, seed=3):
    """A tiny run config of one method; `method_args` are that method's arguments (keyed by its name here)."""
    c = ml_collections.ConfigDict()
    c.teacher = dict(path="unused")
    c.student = dict(num_layers=student_layers, init="uniform")
    c.method = method
    c.method_args = {method: dict(method_args)} if method_args else {}
    c.data = dict(train=dict(task="kdjax_reviews", max_length=max_length, batch_size=batch, pack=False))
    c.train = dict(steps=steps, learning_rate=1e-3, warmup_steps=0, seed=seed)
    return c


def log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl(t_logits, s_logits, temperature=1.0):
    """Per-row T²·KL(p_T ‖ q_T)."""
    logp = log_softmax(np.asarray(t_logits, np.float64) / temperature)
    logq = log_softmax(np.asarray(s_logits, np.float64) / temperature)
    return temperature ** 2 * np.sum(np.exp(logp) * (logp - logq), -1)


def hard_ce(logits, labels):
    """Per-row −log softmax(z)[y]."""
    logq = log_softmax(logits)
    return -np.take_along_axis(logq, np.asarray(labels)[:, None], -1)[:, 0]


def forwards(run, params, batch, taps=None):
    """(student (out, inter), {teacher name: (out, inter)}, prepared batch) from plain forward passes."""
    b = run.prepare_batch(batch)
    s = forward(run.student.graphdef, params, b, taps)
    t = {name: forward(m.graphdef, m.params, b, taps) for name, (m, _) in run.teachers.items()}
    return s, t, b


def assert_copy_resumes_bit_identically(run, batches, k=2):
    """A state copied to host after `k` steps continues exactly as the uninterrupted state: same metrics
    and the same train state after the next step (the recipe's draws are functions of the step)."""
    import jax
    import jax.numpy as jnp
    from kdjax.distill import metric_values
    state = run.init_state()
    for batch in batches[:k]:
        state, _ = run.train_step(state, batch)
    saved = jax.tree.map(np.array, state)
    straight_state, straight = run.train_step(state, batches[k])
    resumed_state, resumed = run.train_step(jax.tree.map(jnp.asarray, saved), batches[k])
    assert metric_values(straight) == metric_values(resumed)
    for a, b in zip(jax.tree.leaves(straight_state), jax.tree.leaves(resumed_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
