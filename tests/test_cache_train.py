"""Training from an offline teacher cache (`data.<source>.teacher_cache`): equal to the live teacher at
k = V, no teacher loaded, exact resume, the cache verified against the run, one-line refusals."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import kdjax
from kdjax import cache
from kdjax.distill import run as run_lib
from kdjax.distill import step as step_lib
from kdjax.distill.run import Distillation
from kdjax.methods.base import MethodError
from kdjax.models.config import ConfigError
from kdjax.students import student_from
from tests.distill_fixtures import save_teacher

ROWS, MAX_LEN, BATCH, VOCAB = 8, 10, 4, 64


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_train")
    rng = np.random.default_rng(1)
    words = "the a river stone quietly seven bright engine market violin".split()
    for name, seed in (("data.jsonl", 1), ("other.jsonl", 2)):
        rng = np.random.default_rng(seed)
        with open(root / name, "w") as f:
            for _ in range(ROWS):
                f.write(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(3, 8))))}) + "\n")
    tok = small_tokenizer(words)
    assert 1 not in tok("the river stone")["input_ids"]  # every word is in the vocabulary
    teacher = _peaked(small_teacher(tok))
    teacher_path = save_teacher(teacher, str(root / "teacher"))
    loaded = run_lib.load_teachers(make_config({"teacher_path": teacher_path, "data": str(root / "data.jsonl")}))
    env = {"root": root, "teacher_path": teacher_path, "data": str(root / "data.jsonl"),
           "other_data": str(root / "other.jsonl"), "teachers": loaded}
    vocab = teacher.config.vocab_size
    # k = V in float32: the cached distribution is the teacher's softmax itself (only reordered).
    env["full"] = str(root / "full")
    cache.write_cache(make_config(env, k=vocab, logprob_format="float32"), env["full"], teachers=loaded,
                      progress=False)
    env["k8"] = str(root / "k8")
    cache.write_cache(make_config(env, k=8), env["k8"], teachers=loaded, progress=False)
    # The same rows written by two processes.
    env["k8x2"] = str(root / "k8x2")
    for p in (1, 0):
        cache.write_cache(make_config(env, k=8), env["k8x2"], process_index=p, process_count=2, teachers=loaded,
                          progress=False)
    student = student_from(loaded["teacher"][0], num_layers=1, init="random", seed=3)
    env["student"] = student
    env["student_path"] = save_teacher(student, str(root / "student"))
    return env


def small_tokenizer(words):
    """A BERT-style word-piece tokenizer over a handful of words (a 64-entry model vocabulary keeps k = V cheap)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def small_teacher(tok, seed=0):
    config = kdjax.preset("bert", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                          head="mlm", max_position_embeddings=32)
    return kdjax.Model.init(config, seed=seed, tokenizer=tok)


def _peaked(model):
    """Larger word embeddings (tied to the MLM decoder): distributions far from uniform, as trained ones are."""
    from kdjax.hub.api import Model, flat_params, params_from_flat
    flat = dict(flat_params(model.params))
    flat["embed/word/embedding"] = flat["embed/word/embedding"] * 20.0
    params = params_from_flat(model.params, flat, model.config.params_dtype)
    return Model(model.config, model.graphdef, params, model.tokenizer)


def make_config(env, teacher_cache=None, *, method="kd", method_args=None, **cache_kw):
    c = ml_collections.ConfigDict()
    c.teacher = dict(path=env["teacher_path"])
    c.student = dict(num_layers=1, layers=(1,))
    c.method = method
    c.method_args = {"kd": dict(alpha=1.0, temperature=1.0)} if method_args is None else method_args
    c.data = dict(train=dict(path=env["data"], format="jsonl", text_fields=("text",), max_length=MAX_LEN,
                             batch_size=BATCH, teacher_cache=teacher_cache))
    c.train = dict(steps=4, learning_rate=1e-3, warmup_steps=0, log_every=1, checkpoint_every=2,
                   async_checkpointing=False, seed=0, max_grad_norm=None)
    c.cache = dict(dict(k=8, rows_per_shard=4, logprob_format="uint16"), **cache_kw)
    return c


@pytest.fixture
def no_teacher_load(env, monkeypatch):
    """Fails the test if anything loads the teacher checkpoint's weights."""
    real = kdjax.hub.api.load_pretrained
    teacher_dir = os.path.realpath(env["teacher_path"])

    def guarded(path, **kw):
        if os.path.realpath(str(path)) == teacher_dir:
            raise AssertionError("the teacher checkpoint was loaded")
        return real(path, **kw)

    monkeypatch.setattr(run_lib, "load_pretrained", guarded)
    monkeypatch.setattr(kdjax.hub.api, "load_pretrained", guarded)


def _loss_and_grads(run, batch, grads=True):
    """The stage's loss and student gradients on `batch` through the step's own teacher pass and loss."""
    prog = run.runner(0).program
    state = run.init_state(0)
    teacher_pass = step_lib.build_teacher_pass(prog.teachers, prog.stage.terms)
    loss_fn = step_lib.build_loss_fn(student_graphdef=prog.student_graphdef, student_config=prog.student_config,
                                     student_taps=prog.student_taps, teachers=prog.teachers, terms=prog.stage.terms,
                                     stage_key=prog.stage_key)
    b = run.prepare_batch(batch)
    t_params = run.teacher_params(0)

    def f(trainable, b, t_params, step):
        return loss_fn(trainable, b, teacher_pass(t_params, b), step, jnp.zeros(()), None, t_params)[0]

    return jax.jit(jax.value_and_grad(f) if grads else f)(state.trainable, b, t_params, state.step)


def test_k_equal_v_first_step_equals_the_live_teacher(env, no_teacher_load):
    batch = next(iter(cache.make_cache_loader(env["full"], batch_size=BATCH, shuffle=False)))
    live = Distillation(make_config(env), teachers=env["teachers"], student=env["student"])
    cached = Distillation(make_config(env, env["full"]), student=env["student"])
    assert cached.teacher_params(0) == {"teacher": None}  # no teacher weights anywhere in the step
    assert cached.teachers["teacher"][0].config.num_layers == 2
    loss_live, g_live = _loss_and_grads(live, batch)
    loss_cache, g_cache = _loss_and_grads(cached, batch)
    assert float(loss_live) > 1e-3  # a real divergence between a 1-layer student and its teacher
    np.testing.assert_allclose(float(loss_cache), float(loss_live), rtol=1e-5, atol=1e-6)
    flat_live, flat_cache = jax.tree.leaves(g_live), jax.tree.leaves(g_cache)
    assert len(flat_live) == len(flat_cache)
    scale = max(float(jnp.max(jnp.abs(g))) for g in flat_live)
    assert scale > 0
    for a, b in zip(flat_live, flat_cache):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale, rtol=1e-4)


def test_training_from_a_cache_loads_no_teacher_and_resumes_exactly(env, tmp_path, no_teacher_load):
    config = make_config(env, env["k8"])
    config.student = dict(path=env["student_path"])
    run = Distillation(config)
    assert all(m.params is None for m, _ in run.teachers.values())
    part = run.fit(str(tmp_path / "a"), max_steps=2, export=False, progress=False)
    assert part["interrupted_at"] == 2
    resumed = run.fit(str(tmp_path / "a"), export=False, progress=False)
    straight = run.fit(str(tmp_path / "b"), export=False, progress=False)
    losses = lambda r: [h["loss"] for h in r["history"] if "loss" in h]  # noqa: E731
    assert len(losses(straight)) == 4 and np.all(np.isfinite(losses(straight)))
    np.testing.assert_allclose(losses(resumed)[-2:], losses(straight)[-2:], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(resumed["state"].params), jax.tree.leaves(straight["state"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_cache_written_by_two_processes_trains_the_same_rows(env, no_teacher_load):
    one = Distillation(make_config(env, env["k8"]), student=env["student"]).stage_caches[0]
    two = Distillation(make_config(env, env["k8x2"]), student=env["student"]).stage_caches[0]
    assert two.manifest["process_count"] == 2
    rows = lambda c: {b["input_ids"][i].tobytes(): b["teacher_topk_ids"][i]  # noqa: E731
                      for r in range(3) for b in cache.make_cache_loader(
                          c.cache_dir, batch_size=1, shuffle=False, num_epochs=1, drop_remainder=False,
                          shard_index=r, shard_count=3) for i in range(len(b["input_ids"]))}
    a, b = rows(one), rows(two)
    assert len(a) == ROWS and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_a_cache_of_another_run_is_refused_in_one_line(env, tmp_path, no_teacher_load):
    def refused(config, *words):
        with pytest.raises((cache.CacheError, MethodError, ConfigError)) as e:
            Distillation(config, student=env["student"])
        message = str(e.value)
        assert "\n" not in message and all(w in message for w in words), message
        return message

    other = tmp_path / "other_teacher"
    save_teacher(_peaked(small_teacher(env["teachers"]["teacher"][0].tokenizer, seed=5)), str(other))
    c = make_config(env, env["k8"])
    c.teacher.path = str(other)
    msg = refused(c, "teacher 'teacher'")
    assert "tokenizer" not in msg and "dataset" not in msg
    c = make_config(env, env["k8"])
    c.data.train.max_length = MAX_LEN + 2
    refused(c, "max_length")
    c = make_config(env, env["k8"])
    c.data.train.path = env["other_data"]
    refused(c, "dataset")
    # Same weights, another tokenizer (one added token).
    retok = tmp_path / "retok"
    shutil.copytree(env["teacher_path"], retok)
    from transformers import AutoTokenizer
    tok2 = AutoTokenizer.from_pretrained(env["teacher_path"])
    tok2.add_tokens(["zzqxv"])
    tok2.save_pretrained(str(retok))
    c = make_config(env, env["k8"])
    c.teacher.path = str(retok)
    msg = refused(c, "tokenizer")
    assert "teacher 'teacher'" not in msg
    # Terms the cache cannot serve.
    refused(make_config(env, env["k8"], method="minilmv2", method_args={}), "reads the teacher's", "live teacher")
    refused(make_config(env, env["k8"], method_args={"kd": dict(alpha=1.0, temperature=10.0)}), "k_temperature=1")
    refused(make_config(env, env["k8"], method_args={"kd": dict(alpha=1.0, temperature=1.0, chunk_size=4)}),
            "chunk_size")
    c = make_config(env, env["k8"])
    c.data.mlm_probability = 0.15
    refused(c, "mlm_probability")


def test_every_divergence_kind_runs_from_the_cache(env, no_teacher_load):
    """Other kinds through the engine equal `sparse_divergence` on the same batch (the kernel itself is
    tested against the dense formulas at k = V in test_sparse_divergences.py)."""
    from kdjax.knowledge.sparse import sparse_divergence
    batch = next(iter(cache.make_cache_loader(env["k8"], batch_size=BATCH, shuffle=False)))
    student = env["student"]
    logits = student(batch["input_ids"], batch["attention_mask"]).logits
    for kind in ("reverse_kl", "tvd"):
        run = Distillation(make_config(env, env["k8"], method_args={"kd": dict(alpha=1.0, temperature=1.0,
                                                                                 kind=kind)}), student=student)
        loss = _loss_and_grads(run, batch, grads=False)
        want, _ = sparse_divergence(logits, batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
                                    batch["teacher_tail_logprob"], batch["attention_mask"], kind=kind)
        np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def test_plan_of_a_cache_backed_stage_has_no_teacher(env):
    """kdjax.plan plans the stage from the cache's manifest: no teacher parameters, no checkpoint opened
    (the teacher path does not even exist), the top-k fields in the batch."""
    from kdjax import plan as P
    from kdjax import sharding as S
    c = make_config(env, env["k8"])
    c.teacher.path = str(env["root"] / "no_such_teacher")
    c.student = dict(num_layers=1, init="random")
    c.data.train.batch_size = 8
    c.mesh = dict(axes=("data", "fsdp", "tensor"), ici=(1, -1, 2), dcn=(1, 1, 1))
    step = P.build_planned_step(c, S.make_mesh(S.MeshConfig.from_config(dict(c.mesh))))
    assert step.abstract_teacher_params == {"teacher": None}
    assert step.abstract_batch["teacher_topk_ids"].shape == (8, MAX_LEN, 8)
    assert step.abstract_batch["teacher_tail_logprob"].shape == (8, MAX_LEN)
    assert step.student_config.head == "mlm" and step.student_config.num_layers == 1
    r = P.plan_step(c, P.get_topology("cpu:8", device_memory_gb=1.0))
    assert r.fits and r.teacher_params == 0
