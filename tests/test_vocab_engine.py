"""GLMD with vocabulary compression end to end on a tiny decoder teacher."""

import os

import jax.numpy as jnp
import numpy as np

import kdjax
from distill_fixtures import save_teacher, tiny_config, tiny_teacher
from kdjax import vocab
from kdjax.distill import Distillation, metric_values
from kdjax.distill.trainer import make_stage_loader
from kdjax.hub.api import flat_params
from kdjax.models.transformer import forward


def test_glmd_vocab_compression_end_to_end(tmp_path):
    teacher = tiny_teacher(head="causal_lm", family="gpt2", layers=2)
    teacher_dir = save_teacher(teacher, str(tmp_path / "teacher"))
    config = tiny_config(teacher_dir, method="glmd", task="kdjax_corpus", steps=2, batch=4, max_length=24)
    for key in ("train", "corpus", "task"):
        config.data[key].task = "kdjax_corpus"
        config.data[key].pack = True
    config.student.init = "random"  # differs from the teacher, so the KL is well above fp32 noise
    config.student.seed = 1
    config.vocab_compression = dict(rate=0.5, rule="dot")
    run = Distillation(config)
    comp = run.compression
    assert comp.size == 15360 and run.student.config.vocab_size == 15360  # ceil(0.5·30522/128)·128
    t_emb = np.asarray(flat_params(run.teachers["teacher"][0].params)["embed/word/embedding"])
    s_emb = np.asarray(flat_params(run.student.params)["embed/word/embedding"])
    np.testing.assert_array_equal(s_emb, t_emb[np.asarray(comp.kept_ids)])
    tok = run.teachers["teacher"][0].tokenizer
    assert set(vocab.special_token_ids(tok)) <= set(np.asarray(comp.kept_ids).tolist())

    # The word-prediction KL uses teacher logits sliced to the kept columns before the softmax and the
    # student on remapped ids.
    batch = next(iter(make_stage_loader(run, 0, seed=0)))
    state = run.init_state(0)
    metrics, _ = run.evaluate_batch(state, batch, 0)
    prepared = run.prepare_batch(batch)
    teacher_model = run.teachers["teacher"][0]
    t_logits = forward(teacher_model.graphdef, teacher_model.params, {"input_ids": prepared["input_ids"],
                       "attention_mask": prepared["attention_mask"]})[0].logits
    s_logits = forward(run.student.graphdef, state.params, {"input_ids": prepared["student_input_ids"],
                       "attention_mask": prepared["attention_mask"]})[0].logits
    t_np = np.asarray(t_logits, np.float64)[..., np.asarray(comp.kept_ids)] / 15.0
    s_np = np.asarray(s_logits, np.float64) / 15.0
    log_p = t_np - np.log(np.exp(t_np - t_np.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t_np.max(-1, keepdims=True)
    log_q = s_np - np.log(np.exp(s_np - s_np.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s_np.max(-1, keepdims=True)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1) * 15.0 ** 2
    mask = np.asarray(prepared["attention_mask"]) == 1
    expected = kl[mask].mean()
    assert expected > 1e-3
    # fp32 log-softmax over 15k columns, scaled by T² = 225: ~1e-5 absolute noise against float64.
    np.testing.assert_allclose(metric_values(metrics)["term/word_kl"], expected, rtol=1e-3, atol=5e-5)
    # Without slicing before the softmax (teacher probabilities not renormalized) the value is different.
    full = np.asarray(t_logits, np.float64) / 15.0
    log_full = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) - full.max(-1, keepdims=True)
    wrong_p = np.exp(log_full[..., np.asarray(comp.kept_ids)])
    wrong = ((wrong_p * (np.log(wrong_p) - log_q)).sum(-1) * 15.0 ** 2)[mask].mean()
    assert abs(wrong - expected) > 20 * 5e-5
    assert int(jnp.max(prepared["student_input_ids"])) < comp.size

    summary = run.fit(str(tmp_path / "wd"), progress=False)
    out = summary["student_dir"]
    assert os.path.exists(os.path.join(out, "vocab_compression.json"))
    student = kdjax.load_pretrained(out)
    assert student.config.vocab_size == 15360
    wrapped = vocab.load_tokenizer(out)
    assert isinstance(wrapped, vocab.CompressedTokenizer)
    enc = wrapped(["Raw text goes through the compressed tokenizer."], padding=True)
    logits = student(enc["input_ids"], enc["attention_mask"]).logits
    assert logits.shape[-1] == 15360 and np.isfinite(np.asarray(logits)).all()
