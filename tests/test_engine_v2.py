"""The engine's extension points, exercised by a method that lives in tests/ (routed_method.py).

Each dynamic ingredient is checked against an independent NumPy computation or a direct property:
per-step random layers (traced, reproducible, uniformly drawn), a method module (trained at its own
rate, never exported), a weight schedule, per-example routing between two teachers, forward hooks
(interchange and block replacement) and a host-side data hook.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import kdjax
import routed_method  # noqa: F401  (registers the test-only method and knowledge kind)
from distill_fixtures import tiny_teacher, tokenizer
from kdjax.distill import Distillation, metric_values
from kdjax.distill.hooks import DataHook
from kdjax.distill.trainer import make_stage_loader
from kdjax.hub.api import flat_params
from kdjax.knowledge import registry
from kdjax.methods.base import Method, Stage, Term
from kdjax.hub.api import abstract_model, params_from_flat
from kdjax.models.transformer import BlockContext, ForwardHooks, apply_block, forward

STEPS = 4


def _config(method="routed_random_layers", method_args=None, student_layers=2):
    c = ml_collections.ConfigDict()
    c.teacher = dict(path="unused")
    c.student = dict(num_layers=student_layers, init="uniform")
    c.method = method
    c.method_args = method_args or {}
    c.data = dict(train=dict(task="kdjax_reviews", max_length=16, batch_size=8, pack=False))
    c.train = dict(steps=STEPS, learning_rate=1e-3, warmup_steps=0, seed=3)
    return c


@pytest.fixture(scope="module")
def teachers():
    return {"small": (tiny_teacher(layers=2, hidden=32, seed=1), 1.0),
            "large": (tiny_teacher(layers=4, hidden=48, heads=4, seed=2), 1.0)}


@pytest.fixture(scope="module")
def batches(teachers):
    run = Distillation(_config(), teachers=teachers)
    it = iter(make_stage_loader(run, 0, seed=0))
    return [next(it) for _ in range(STEPS)]


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference_loss(run, state, batch, step):
    """The method's loss written out in NumPy from plain forward passes (float64)."""
    b = run.prepare_batch(batch)
    mask = np.asarray(b["attention_mask"], np.float64)
    s_out, s_inter = forward(run.student.graphdef, state.params, b, {"hidden_states": None})
    t = {name: forward(m.graphdef, m.params, b, {"hidden_states": None}) for name, (m, _) in run.teachers.items()}
    temperature = 2.0
    logq = _np_log_softmax(np.asarray(s_out.logits) / temperature)
    kd = {}
    for name, (out, _) in t.items():
        logp = _np_log_softmax(np.asarray(out.logits) / temperature)
        kd[name] = temperature ** 2 * np.sum(np.exp(logp) * (logp - logq), -1)
    logq1 = _np_log_softmax(np.asarray(s_out.logits))
    entropy = -np.sum(np.exp(logq1) * logq1, -1) / np.log(logq1.shape[-1])
    rank = np.argsort(np.argsort(-entropy, kind="stable"), kind="stable")
    to_small = rank < len(entropy) // 2
    kd_loss = np.mean(np.where(to_small, kd["small"], kd["large"]))
    # Feature term: the drawn layers, re-derived from the stage key exactly as documented.
    layers = _drawn_layers(run, step, count=run.student.config.num_layers, high=5)
    hs = np.asarray(s_inter.hidden_states, np.float64)             # [L_S+1, B, S, D]
    ht = np.asarray(t["large"][1].hidden_states, np.float64)       # [L_T+1, B, S, Dt]

    def pool(h):
        return np.einsum("nbsd,bs->nbd", h, mask) / mask.sum(1)[None, :, None]

    kernel = np.asarray(state.modules["teacher_proj"]["kernel"], np.float64)
    diff = pool(hs[1:]) - pool(ht[layers]) @ kernel
    feature = np.mean(np.sum(diff ** 2, -1))
    weight = 1.0 - step / STEPS
    return kd_loss + weight * feature, layers, to_small.mean()


def _drawn_layers(run, step, count, high, every=1):
    key = run.runner(0).stage_key
    import zlib
    base = jax.random.fold_in(key, zlib.crc32(b"pooled/teacher/layers") & 0x7FFFFFFF)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(base, step // every), high - 1))
    return np.sort(perm[:count]) + 1


def test_dynamic_method_loss_equals_numpy_reference(teachers, batches):
    run = Distillation(_config(), teachers=teachers)
    state = run.init_state()
    seen = set()
    for step, batch in enumerate(batches):
        expected, layers, share = _reference_loss(run, state, batch, step)
        state, metrics = run.train_step(state, batch)
        values = metric_values(metrics)
        np.testing.assert_allclose(values["loss"], expected, rtol=2e-4, err_msg=f"step {step}")
        got_layers = [int(round(values[f"pooled/layer{k}"])) for k in range(2)]
        assert got_layers == list(layers)
        assert values["routed/share_small"] == pytest.approx(share)
        seen.add(tuple(got_layers))
    assert len(seen) > 1, "the teacher layers were never re-drawn"


def test_random_layers_are_uniform_distinct_sorted_and_a_function_of_the_step(teachers):
    run = Distillation(_config(), teachers=teachers)
    draws = np.stack([_drawn_layers(run, s, count=2, high=5) for s in range(400)])
    assert np.all(np.diff(draws, axis=1) > 0) and draws.min() >= 1 and draws.max() <= 4
    counts = np.bincount(draws.ravel(), minlength=5)[1:]
    expected = draws.size / 4
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 16.3, (counts, chi2)  # 3 degrees of freedom, p = 0.001
    # The engine's own draw for a step is that function of the step (so a resumed run redraws it).
    ctx = registry.TermContext(step=jnp.asarray(7), progress=0.0, stage_key=run.runner(0).stage_key, batch={},
                               student=run.student.config, teacher=teachers["large"][0].config, teacher_name="large",
                               s_out=None, s_inter=None, t_out=None, t_inter=None)
    term = run.method.stages[0].terms[1]
    np.testing.assert_array_equal(np.asarray(ctx.random_layers(term, "teacher", 2, low=1, high=5)),
                                  _drawn_layers(run, 7, count=2, high=5))


def test_resumed_state_continues_bit_identically(teachers, batches):
    run = Distillation(_config(), teachers=teachers)
    state = run.init_state()
    for batch in batches[:2]:
        state, _ = run.train_step(state, batch)
    saved = jax.tree.map(np.array, state)  # what a checkpoint holds
    straight = [metric_values(run.train_step(state, b)[1]) for b in batches[2:3]]
    fresh = Distillation(_config(), teachers=teachers)
    restored = jax.tree.map(jnp.asarray, saved)
    resumed = [metric_values(fresh.train_step(restored, b)[1]) for b in batches[2:3]]
    assert straight == resumed


def test_module_trains_at_its_own_rate_and_is_never_exported(teachers, batches, tmp_path):
    frozen = Distillation(_config(method_args={"routed_random_layers": {"proj_learning_rate": 0.0}}),
                          teachers=teachers)
    state = frozen.init_state()
    before = jax.tree.map(np.array, state.modules["teacher_proj"])
    student_before = flat_params(jax.tree.map(np.array, state.params))
    state, _ = frozen.train_step(state, batches[0])
    np.testing.assert_array_equal(before["kernel"], np.asarray(state.modules["teacher_proj"]["kernel"]))
    assert any(not np.allclose(v, flat_params(state.params)[k]) for k, v in student_before.items())

    run = Distillation(_config(), teachers=teachers)
    state = run.init_state()
    state, _ = run.train_step(state, batches[0])
    assert not np.allclose(before["kernel"], np.asarray(state.modules["teacher_proj"]["kernel"]))
    out = kdjax.save_pretrained(run.student_model(state), str(tmp_path / "student"))
    from safetensors.numpy import load_file
    names = load_file(os.path.join(out, "model.safetensors"))
    assert not any("proj" in n for n in names)
    assert all(v.shape != before["kernel"].shape for v in names.values())


def test_weight_schedule_follows_the_step(teachers, batches):
    run = Distillation(_config(), teachers=teachers)
    state = run.init_state()
    for step, batch in enumerate(batches[:3]):
        state, metrics = run.train_step(state, batch)
        values = metric_values(metrics)
        np.testing.assert_allclose(values["term/pooled"], (1 - step / STEPS) * values["pooled"], rtol=1e-5)


def test_per_example_losses_refuse_batch_coupled_terms(teachers, batches):
    def loss(sctx):
        return sctx.per_example("small").mean(), {}

    method = Method("coupled", (Stage("s", (Term.make("sample_relation_kl", "cls", layers=((2, 2),)),), loss=loss),))
    config = _config(method="kd")
    run = Distillation(config, teachers=teachers)
    run.method = method
    with pytest.raises(kdjax.methods.MethodError, match="batch-coupled"):
        run.train_step(run.init_state(), batches[0])


# ------------------------------------------------------------------------------------------------
# Forward hooks.


def _model_batch(model, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 200, (3, 10)).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((3, 10), jnp.int32),
            "token_type_ids": jnp.zeros((3, 10), jnp.int32)}


@pytest.mark.parametrize("scan", [True, False])
def test_interchange_hook_rewrites_chosen_positions_at_a_traced_layer(scan):
    model = tiny_teacher(layers=3, seed=4)
    graphdef, _ = abstract_model(model.config.replace(scan_layers=scan))
    params = model.params  # one stacked layout for scanned and unrolled execution
    base, source = _model_batch(model, 0), _model_batch(model, 1)
    _, src = forward(graphdef, params, source, {"hidden_states": None})
    positions = jnp.asarray([2, 5])

    def block(layer, h_in, h_out, ctx):
        swapped = h_out.at[:, positions].set(src.hidden_states[2][:, positions])  # layer 1 output = hidden index 2
        return jnp.where(layer == 1, swapped, h_out)

    out, _ = jax.jit(lambda p: forward(graphdef, p, base, hooks=ForwardHooks(block=block)))(params)
    # Reference: the layers one by one, the swap done by hand.
    m = nnx.merge(graphdef, params)
    _, hidden = forward(graphdef, params, base, {"hidden_states": None})
    h = hidden.hidden_states[0]
    ctx = BlockContext(m._attention_mask(base["attention_mask"]), None)
    for layer in range(3):
        h = apply_block(graphdef, params, layer, h, ctx)
        if layer == 1:
            h = h.at[:, positions].set(src.hidden_states[2][:, positions])
    np.testing.assert_allclose(out.last_hidden_state, h, atol=1e-5)
    plain, _ = forward(graphdef, params, base)
    assert not np.allclose(plain.last_hidden_state, out.last_hidden_state, atol=1e-3)


def test_block_replacement_by_teacher_blocks_gives_the_teacher():
    teacher = tiny_teacher(layers=2, seed=5)
    student = tiny_teacher(layers=2, seed=6)
    s_flat = dict(flat_params(student.params))
    for k, v in flat_params(teacher.params).items():
        if not k.startswith("layers/"):
            s_flat[k] = v  # same embeddings and head: only the blocks differ
    s_params = params_from_flat(student.params, s_flat, student.config.params_dtype)
    batch = _model_batch(teacher)
    replace = jnp.asarray([True, True])

    def block(layer, h_in, h_out, ctx):
        return jnp.where(replace[layer], apply_block(teacher.graphdef, teacher.params, layer, h_in, ctx), h_out)

    mixed, _ = forward(student.graphdef, s_params, batch, hooks=ForwardHooks(block=block))
    reference, _ = forward(teacher.graphdef, teacher.params, batch)
    own, _ = forward(student.graphdef, s_params, batch)
    np.testing.assert_allclose(mixed.last_hidden_state, reference.last_hidden_state, atol=1e-5)
    np.testing.assert_allclose(mixed.logits, reference.logits, atol=1e-6)
    assert not np.allclose(own.last_hidden_state, reference.last_hidden_state, atol=1e-2)


def test_embedding_hook_perturbs_the_input_states():
    model = tiny_teacher(layers=2, seed=7)
    batch = _model_batch(model)
    delta = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (3, 10, 32))
    _, hidden = forward(model.graphdef, model.params, batch, {"hidden_states": (0,)},
                        hooks=ForwardHooks(embeddings=lambda h: h + delta))
    _, plain = forward(model.graphdef, model.params, batch, {"hidden_states": (0,)})
    np.testing.assert_allclose(hidden.hidden_states[0], plain.hidden_states[0] + delta, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Data hooks.


class MaskSome(DataHook):
    """Masks one random valid token per row and counts its calls (state kept across steps)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, run, state, batch, rng, *, stage, step):
        self.calls += 1
        ids = np.array(batch["input_ids"])
        valid = np.asarray(batch["attention_mask"]) == 1
        for row in range(ids.shape[0]):
            ids[row, rng.choice(np.flatnonzero(valid[row]))] = 103
        return {**batch, "input_ids": ids, "hook_step": np.full(ids.shape[:1], step, np.int32)}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])


def test_data_hook_is_reproducible_and_checkpointable(teachers, batches):
    seen = []

    def loss(sctx):
        seen.append(sctx.batch["hook_step"])  # the hook's new field reaches the step
        return sctx.default_loss()

    def method():
        hook = MaskSome()
        return Method("hooked", (Stage("s", (Term.make("divergence", "logits", temperature=2.0),), loss=loss,
                                       data_hook=hook),)), hook

    results = []
    for _ in range(2):
        run = Distillation(_config(method="kd"), teachers={"small": teachers["small"]})
        run.method, hook = method()
        state = run.init_state()
        metrics = []
        for batch in batches[:2]:
            state, m = run.train_step(state, batch)
            metrics.append(metric_values(m))
        results.append(metrics)
        assert hook.calls == 2 and run.host_state() == {"0": {"calls": 2}}
    assert results[0] == results[1]
    run.restore_host_state({"0": {"calls": 7}})
    assert hook.calls == 7
    assert seen, "the step never saw the hook's field"
    # Different steps draw different masks.
    rng_a, rng_b = (np.random.default_rng([3, 0, s, 0xDA7A]) for s in (0, 1))
    assert rng_a.integers(1 << 30) != rng_b.integers(1 << 30)
