"""On-policy recipes in the engine: the sampler's distribution, a short run of every recipe, exact resume
of a killed run whose replay buffer lives in the checkpoint (tiny Llama-style causal models)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

import kdjax
from distill_fixtures import tokenizer
from kdjax.distill import Distillation, metric_values
from kdjax.hub.api import flat_params, params_from_flat
from kdjax.methods.onpolicy import FROM_DATA, FROM_REPLAY, FROM_STUDENT, FROM_TEACHER, _sample_jit
from kdjax.models.transformer import forward

V = 48


def _llama(seed, layers=2, hidden=32, vocab=V, tok=None):
    config = kdjax.preset("llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=4,
                          num_kv_heads=2, intermediate_size=2 * hidden, head="causal_lm", max_position_embeddings=64)
    return kdjax.Model.init(config, seed=seed, tokenizer=tok)


def _sharp(model, factor):
    """The model with its LM head scaled: peaked next-token distributions (random init is near uniform)."""
    flat = flat_params(model.params)
    flat["decoder/kernel"] = np.asarray(flat["decoder/kernel"]) * factor
    return kdjax.Model(model.config, model.graphdef, params_from_flat(model.params, flat, jnp.float32))


def _np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _next_probs(model, ids):
    out, _ = forward(model.graphdef, model.params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return _np_softmax(np.asarray(out.logits)[:, -1])


def test_mixture_sampler_draws_from_alpha_teacher_plus_student():
    """Empirical first- and second-token marginals of 4096 samples against α p + (1 − α) q from plain
    forward passes (the second one summed over every first token)."""
    student = _sharp(_llama(1, layers=1, hidden=16, vocab=12), 30.0)
    teacher = _sharp(_llama(2, layers=1, hidden=16, vocab=12), 30.0)
    alpha, n, vocab = 0.3, 4096, 12
    prompt = np.array([[3, 7, 1]], np.int32)
    ids = np.repeat(prompt, n, 0)
    tokens, lengths = _sample_jit(student.graphdef, student.params, teacher.graphdef, teacher.params, ids,
                                  np.ones_like(ids), jax.random.key(5), max_new_tokens=2, alpha=alpha,
                                  temperature=1.0, eos_token_id=None)
    tokens = np.asarray(tokens)
    assert np.asarray(lengths).tolist() == [2] * n
    mix1 = alpha * _next_probs(teacher, prompt)[0] + (1 - alpha) * _next_probs(student, prompt)[0]
    second_prompts = np.concatenate([np.repeat(prompt, vocab, 0), np.arange(vocab)[:, None]], 1).astype(np.int32)
    mix2 = alpha * _next_probs(teacher, second_prompts) + (1 - alpha) * _next_probs(student, second_prompts)
    marginal2 = mix1 @ mix2
    for empirical, expected in ((np.bincount(tokens[:, 0], minlength=vocab) / n, mix1),
                                (np.bincount(tokens[:, 1], minlength=vocab) / n, marginal2)):
        tv = 0.5 * np.abs(empirical - expected).sum()
        assert tv < 0.04, (tv, empirical, expected)                # sampling noise: TV ~ 0.015 here
    # The student alone is visibly another distribution, so the check above can fail.
    q1 = _next_probs(student, prompt)[0]
    assert 0.5 * np.abs(q1 - mix1).sum() > 0.1


def _config(method, args, steps=3, **train):
    c = ml_collections.ConfigDict()
    c.teacher = dict(path="unused")
    c.student = dict(num_layers=1, init="uniform")
    c.method = method
    c.method_args = {method: args}
    c.data = dict(train=dict(task="kdjax_corpus", max_length=12, batch_size=4, pack=False))
    c.train = dict(dict(steps=steps, learning_rate=3e-3, warmup_steps=0, seed=3, log_every=1, checkpoint_every=2,
                        async_checkpointing=False), **train)
    return c


@pytest.fixture(scope="module")
def teacher():
    return _llama(7)


RECIPES = [("gkd_onpolicy", dict(lmbda=0.5, seq_kd=True, prompt_length=4)), ("onpolicy_rkl", dict(prompt_length=4)),
           ("minillm_pg", dict(prompt_length=4)), ("distillm_adaptive", dict(max_prob=1.0, ramp=0.5, prompt_length=4))]


def test_every_recipe_runs_a_few_steps(teacher):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (4, 12)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}
    for name, args in RECIPES:
        run = Distillation(_config(name, args), teachers={"teacher": (teacher, 1.0)})
        hook = run.method.stages[0].data_hook
        state = run.init_state()
        before = jax.tree.map(np.asarray, state.params)
        sources = []
        for step in range(3):
            seen = hook(run, state, batch, np.random.default_rng([3, 0, step, 0xDA7A]), stage=0, step=step)
            sources.append(int(seen["sampled"][0]))
            assert (seen["labels"][:, :4] == -100).all()             # prompts are never scored
            if sources[-1] in (FROM_STUDENT, FROM_TEACHER):          # replay rows come in buffer order
                np.testing.assert_array_equal(seen["input_ids"][:, :4], ids[:, :4])
                assert not np.array_equal(seen["input_ids"], ids)
            state, metrics = run.train_step(state, batch)
            values = metric_values(metrics)
            assert np.isfinite(values["loss"]), (name, values)
        moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(b) - a).max()), before, state.params)
        assert max(jax.tree.leaves(moved)) > 0, name
        expected = {"gkd_onpolicy": {FROM_STUDENT, FROM_TEACHER}, "onpolicy_rkl": {FROM_STUDENT},
                    "minillm_pg": {FROM_STUDENT}, "distillm_adaptive": {FROM_DATA, FROM_REPLAY}}[name]
        assert set(sources) <= expected and sources, (name, sources)
        if name == "distillm_adaptive":
            assert sources[0] == FROM_DATA and sources[2] == FROM_REPLAY and len(hook.buffer) > 0
        if name == "minillm_pg":
            assert 0.5 < values["minillm/weight"] <= 1.0 / 0.8 + 1e-6   # q/p̃ is at most 1/(1 − α)


def test_killed_run_resumes_bit_identically_with_its_replay_buffer(tmp_path):
    """fit() 4 steps straight vs. 2 steps, a new process-like run (fresh hook, empty buffer), resume: the
    same metrics at every step, the same replay buffer and the same exported student."""
    teacher = _llama(7, vocab=30522, hidden=16, layers=2, tok=tokenizer())
    args = dict(max_prob=1.0, ramp=0.25, capacity=12, prompt_length=4)

    def run():
        return Distillation(_config("distillm_adaptive", args, steps=4), teachers={"teacher": (teacher, 1.0)})

    full = run()
    full.fit(str(tmp_path / "full"), progress=False)
    first = run()
    first.fit(str(tmp_path / "killed"), progress=False, max_steps=2)
    assert len(first.method.stages[0].data_hook.buffer) > 0
    resumed = run()
    assert resumed.method.stages[0].data_hook.buffer == []
    resumed.fit(str(tmp_path / "killed"), progress=False)

    def records(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return {r["global_step"]: {k: v for k, v in r.items() if k.startswith(("loss", "distillm", "onpolicy"))}
                for r in rows if "loss" in r}

    a, b = records(str(tmp_path / "full")), records(str(tmp_path / "killed"))
    assert sorted(a) == sorted(b) and len(a) >= 3
    assert a == b
    assert full.host_state() == resumed.host_state()
    wa = load_file(os.path.join(tmp_path, "full", "student", "model.safetensors"))
    wb = load_file(os.path.join(tmp_path, "killed", "student", "model.safetensors"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
