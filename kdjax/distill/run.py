"""`Distillation`: a config turned into teachers, a student, a method and one jitted step per stage.

        run = kdjax.distill.Distillation(config)
        state = run.init_state()
        state, metrics = run.train_step(state, batch)
        summary = run.fit()            # the whole multi-stage run, checkpointed and resumable
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kdjax.distill import stage as stage_lib
from kdjax.distill import step as step_lib
from kdjax.distill.hooks import hook_rng
from kdjax.distill import terms as terms_lib
from kdjax.hub.api import Model, flat_params, load_pretrained, params_from_flat
from kdjax.hub.checkpoint import resolve_model_path  # noqa: F401  (re-exported for configs and tests)
from kdjax.methods.base import Method, Stage, build_method
from kdjax.models.config import ConfigError
from kdjax.models.transformer import Transformer
from kdjax.students import student_from

from kdjax.config import as_dict, cfg_get, get, method_args

log = logging.getLogger("kdjax")

_cfg_get = cfg_get  # the lenient reading (None -> default) for sections that are free-form
_as_dict = as_dict


def build_mesh(config):
    """The device mesh of `config.mesh` over all devices, or None when the config has no mesh section.

    With one device the mesh is trivial and the run takes the plain jitted path; with more, teacher and
    student parameters, optimizer state and batches are laid out on the mesh by their rules.
    """
    spec = _cfg_get(config, "mesh")
    if not spec:
        return None
    from kdjax import sharding as sharding_lib
    return sharding_lib.make_mesh(sharding_lib.MeshConfig.from_config(_as_dict(spec)))


def model_rules(config, role: str, name: Optional[str] = None) -> dict:
    """Logical-axis rules of one model: the defaults for its role merged with `<model>.rules` overrides.

    `role` is "teacher" (`config.teachers[name].rules`, else `config.teacher.rules`) or "student"
    (`config.student.rules`). Activation rules are part of both defaults, so the two models' intermediates
    meet in a loss with the same layout.
    """
    from kdjax import sharding as sharding_lib
    if role == "student":
        base, spec = sharding_lib.DEFAULT_STUDENT_RULES, _cfg_get(config, "student")
    elif role == "teacher":
        base = sharding_lib.DEFAULT_TEACHER_RULES
        spec = _cfg_get(_cfg_get(config, "teachers"), name) if name else None
        spec = spec or _cfg_get(config, "teacher")
    else:
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    return sharding_lib.merge_rules(base, _as_dict(_cfg_get(spec, "rules")))


TEACHER_LOAD_KEYS = ("dtype", "head", "scan_layers", "remat_policy", "param_dtype")
STUDENT_SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
                      "head", "dtype", "param_dtype", "num_labels", "scan_layers", "remat_policy", "dropout",
                      "attention_dropout")


def teacher_specs(config) -> dict[str, dict]:
    """`{name: spec}` of `config.teachers` (an ensemble) or the single `config.teacher` (named "teacher")."""
    specs = {n: s for n, s in _as_dict(_cfg_get(config, "teachers")).items() if s}
    specs = specs or {"teacher": _as_dict(_cfg_get(config, "teacher"))}
    if not any(specs.values()):
        raise ConfigError("the config names no teacher: set config.teacher.path (a HF directory or hub id)")
    return {name: _as_dict(spec) for name, spec in specs.items()}


def teacher_weight(spec: Mapping[str, Any]) -> float:
    """A teacher's ensemble weight (default 1; 0 is a weight like any other)."""
    value = spec.get("weight")
    return 1.0 if value is None else float(value)


def teacher_load_kwargs(spec: Mapping[str, Any]) -> dict:
    return {key: spec[key] for key in TEACHER_LOAD_KEYS if spec.get(key) is not None}


def checkpoint_model_config(spec: Mapping[str, Any]):
    """The `ModelConfig` of a teacher checkpoint from its config.json and tensor names (no weights read)."""
    from kdjax.hub import checkpoint as ckpt
    from kdjax.hub.api import checkpoint_config
    directory = ckpt.resolve_checkpoint_dir(resolve_model_path(spec["path"]))
    return checkpoint_config(ckpt.read_hf_config(directory), ckpt.TensorReader(directory).names(),
                             **teacher_load_kwargs(spec))


def student_kwargs(config, method: Method) -> tuple[Any, dict]:
    """(layer init, `student_from` keyword arguments) of `config.student` (a student derived from a teacher)."""
    spec = _as_dict(_cfg_get(config, "student"))
    init = spec.get("layers") or spec.get("init") or method.student_init
    if isinstance(init, list):
        init = tuple(init)
    return init, {k: spec[k] for k in STUDENT_SHAPE_KEYS if spec.get(k) is not None}


def optimizer_settings(config) -> "stage_lib.OptimizerSettings":
    """The optimizer of `config.train` (every stage; a stage may override the learning rate). Defaults are
    the schema's (`kdjax.config`); `train.max_grad_norm=None` turns clipping off."""
    norm = get(config, "train.max_grad_norm")
    return stage_lib.OptimizerSettings(
        learning_rate=float(get(config, "train.learning_rate")), warmup_steps=int(get(config, "train.warmup_steps") or 0),
        warmup_ratio=float(get(config, "train.warmup_ratio") or 0.0), schedule=get(config, "train.schedule"),
        weight_decay=float(get(config, "train.weight_decay")), max_grad_norm=None if norm is None else float(norm))


def stage_steps(config, stage: Stage) -> int:
    return int(stage.steps or get(config, "train.steps"))


def load_teachers(config, mesh=None) -> dict[str, tuple[Model, float]]:
    """`config.teachers = {name: {path, weight, dtype, head}}` or a single `config.teacher`.

    On a mesh of several devices, safetensors checkpoints are streamed straight into each teacher's
    layout (`kdjax.hub.streaming.load_sharded`: every process reads only its devices' blocks, so no host
    holds a whole large teacher); PyTorch `.bin` checkpoints are read whole and then placed.
    """
    teachers = {}
    for name, spec in teacher_specs(config).items():
        if not spec.get("path"):
            raise ConfigError(f"teacher {name!r} has no path")
        kw = teacher_load_kwargs(spec)
        path = resolve_model_path(spec["path"])
        if mesh is not None and mesh.size > 1 and _is_safetensors_dir(path):
            from kdjax.hub.streaming import load_sharded
            from kdjax import sharding as sharding_lib
            rules = sharding_lib.validate_rules(model_rules(config, "teacher", name), mesh)
            model = load_sharded(path, mesh, rules, progress=jax.process_index() == 0, **kw)
        else:
            model = load_pretrained(path, **kw)
        teachers[name] = (model, teacher_weight(spec))
    return teachers


def _override_tokenizer(path: Optional[str], tokenizer):
    """The tokenizer at `path` (a `teacher.tokenizer` / `student.tokenizer` directory), else `tokenizer`."""
    if not path:
        return tokenizer
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer at {path!r} ({type(e).__name__}); point it at a "
                          "directory with tokenizer files") from None


def _is_safetensors_dir(path: str) -> bool:
    from kdjax.hub import checkpoint as ckpt
    try:
        return ckpt.checkpoint_files(ckpt.resolve_checkpoint_dir(path, allow_download=False))[0] == "safetensors"
    except Exception:  # a hub id or a broken directory: load_pretrained reports it in one line
        return False


def build_student(config, teacher: Model, method: Method, compression=None) -> Model:
    spec = _as_dict(_cfg_get(config, "student"))
    if spec.get("path"):
        kw = {k: spec[k] for k in ("dtype", "head", "param_dtype", "dropout", "attention_dropout")
              if spec.get(k) is not None}
        return load_pretrained(resolve_model_path(spec["path"]), **kw)
    init, kw = student_kwargs(config, method)
    if compression is not None:
        kw["vocab_size"] = compression.size
    student = student_from(teacher, init=init, seed=int(spec.get("seed", 0)), **kw)
    if compression is not None:
        student = compress_student_vocab(student, teacher, compression)
    return student


def build_vocab_compression(config, teacher: Model, rate: float):
    """GLMD vocabulary compression from token frequencies of the run's corpus and the teacher's embeddings."""
    from kdjax import vocab as vocab_lib
    from kdjax.data import pipeline
    from kdjax.data import tasks as tasks_lib
    vc = _cfg_get(config, "vocab_compression")
    if teacher.tokenizer is None:
        raise ConfigError("vocabulary compression counts token frequencies with the teacher's tokenizer; "
                          "load the teacher from a directory with tokenizer files")
    data = _cfg_get(config, "data")
    spec = _cfg_get(data, _cfg_get(vc, "data", "corpus")) or _cfg_get(data, "train")
    task = tasks_lib.get_task(_cfg_get(spec, "task", "kdjax_corpus"))
    loader = pipeline.make_task_loader(task, "train", teacher.tokenizer, data_dir=_cfg_get(spec, "data_dir"),
                                       max_length=int(_cfg_get(spec, "max_length", 128)), batch_size=64,
                                       shuffle=False, num_epochs=1, drop_remainder=False, pack=False)
    pad = teacher.tokenizer.pad_token_id
    freqs = vocab_lib.count_token_frequencies(
        (b["input_ids"][b["attention_mask"] == 1] for b in loader), teacher.config.vocab_size,
        ignore_ids=() if pad is None else (pad,))
    required = []
    for word in (getattr(task, "verbalizer", None) or ()):
        required += teacher.tokenizer.convert_tokens_to_ids(teacher.tokenizer.tokenize(word))
    embeddings = np.asarray(flat_params(teacher.params)["embed/word/embedding"], np.float32)
    unk = teacher.tokenizer.unk_token_id
    return vocab_lib.VocabCompression.build(
        freqs, embeddings, rate=rate, special_ids=vocab_lib.special_token_ids(teacher.tokenizer),
        required_ids=tuple(required), rule=_cfg_get(vc, "rule", "dot"), unk_id=unk)


def compress_student_vocab(student: Model, teacher: Model, compression) -> Model:
    """Student embedding / LM-head rows = the teacher's rows of the kept tokens (GLMD-vc)."""
    t_flat = flat_params(teacher.params)
    s_flat = dict(flat_params(student.params))
    for key in ("embed/word/embedding", "mlm_bias"):
        if key in t_flat and key in s_flat:
            s_flat[key] = compression.compress_rows(np.asarray(t_flat[key]))
    if "decoder/kernel" in t_flat and "decoder/kernel" in s_flat:
        s_flat["decoder/kernel"] = np.asarray(t_flat["decoder/kernel"])[:, np.asarray(compression.kept_ids)]
    params = params_from_flat(student.params, s_flat, student.config.params_dtype)
    from kdjax.vocab import CompressedTokenizer
    tokenizer = CompressedTokenizer(student.tokenizer, compression) if student.tokenizer is not None else None
    return Model(student.config, student.graphdef, params, tokenizer, source=student.source,
                 id2label=student.id2label)


def with_head(model: Model, head: str, num_labels: Optional[int] = None) -> Model:
    """The same trunk with another head (new head parameters, trunk copied)."""
    config = model.config.replace(head=head, num_labels=num_labels or model.config.num_labels)
    if config == model.config:
        return model
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
    old = flat_params(model.params)
    new = flat_params(params)
    merged = {k: (old[k] if k in old and old[k].shape == v.shape else v) for k, v in new.items()}
    return Model(config, graphdef, params_from_flat(params, merged, config.params_dtype), model.tokenizer,
                              source=model.source, id2label=model.id2label)


def _shapes(flat: Mapping[str, Any]) -> dict:
    return {k: tuple(v.shape) for k, v in flat.items()}


@dataclasses.dataclass
class StageRunner:
    """A stage's program (`kdjax.distill.stage.StageProgram`) with its jitted step and eval."""

    program: stage_lib.StageProgram
    step_fn: Any  # jitted
    eval_fn: Any  # jitted
    state_shardings: Any = None  # a TrainState of NamedShardings on a multi-device mesh, else None

    def __getattr__(self, name):  # index, stage, steps, teachers, student_config, tx, update_mask, ...
        if name == "program":
            raise AttributeError(name)
        return getattr(self.program, name)


class _MeshStep:
    """The stage step jitted with explicit in/out shardings on a mesh.

    State and teacher parameters have fixed layouts; the batch is split over the student's `act_batch`
    axes. One program is compiled per batch structure (the fields a stage feeds do not change during a
    run, so in practice one), and a host batch is placed with `kdjax.sharding.shard_batch`, which checks
    that its rows divide evenly over the data shards and, on several hosts, assembles the global batch
    from each process's rows.
    """

    def __init__(self, step_fn, state_shardings, teacher_shardings, token_sharding, mesh):
        from jax.sharding import NamedSharding, PartitionSpec
        self.step_fn = step_fn
        self.state_shardings = state_shardings
        self.teacher_shardings = teacher_shardings
        self.token_sharding = token_sharding
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self._compiled: dict = {}

    def batch_shardings(self, batch: Mapping[str, Any]) -> dict:
        from kdjax.sharding import _fit_to_rank
        return {k: _fit_to_rank(self.token_sharding, np.ndim(v)) for k, v in batch.items()}

    def __call__(self, state, teacher_params, batch):
        from kdjax.sharding import shard_batch
        shardings = self.batch_shardings(batch)
        key = tuple(sorted((k, np.ndim(v)) for k, v in batch.items()))
        fn = self._compiled.get(key)
        if fn is None:
            fn = jax.jit(self.step_fn, in_shardings=(self.state_shardings, self.teacher_shardings, shardings),
                         out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
            self._compiled[key] = fn
        return fn(state, dict(teacher_params), shard_batch({k: np.asarray(v) for k, v in batch.items()}, shardings))


def _check_cache_run(config) -> None:
    """One line for settings that change the inputs a teacher cache was written for, or need a live teacher."""
    if float(get(config, "data.mlm_probability") or 0.0):
        raise ConfigError("data.mlm_probability masks tokens the cached teacher saw unmasked; set it to 0 with "
                          "data.<source>.teacher_cache (or cache a masked data set)")
    if int(get(config, "train.eval_every") or 0):
        raise ConfigError("train.eval_every evaluates against a live teacher on the eval split, which has no "
                          "cache; set it to 0 with data.<source>.teacher_cache")
    report = _cfg_get(config, "report")
    live = [k for k in ("embedding_agreement", "latency") if _cfg_get(report, k)]
    if live:
        raise ConfigError(f"report.{live[0]} runs the teacher, which a cache-backed run does not load; set it to "
                          "False (compare with python -m kdjax.evaluate --teacher=... after training)")
    if float(_cfg_get(_cfg_get(config, "vocab_compression"), "rate", 0.0) or 0.0):
        raise ConfigError("vocab_compression slices the teacher's full logits, which a teacher cache does not "
                          "hold; drop it or data.<source>.teacher_cache")
    if build_mesh(config) is not None and jax.device_count() > 1:
        raise ConfigError("data.<source>.teacher_cache runs on one device for now; drop config.mesh")


class Distillation:
    """A distillation run built from an ml_collections config (see `configs/`)."""

    def __init__(self, config, *, teachers: Optional[Mapping[str, tuple[Model, float]]] = None,
                              student: Optional[Model] = None, workdir: Optional[str] = None):
        self.config = config
        self.workdir = workdir
        self.method = build_method(get(config, "method"), method_args(config))
        self.mesh = build_mesh(config)
        from kdjax.cache import stage_caches
        self.stage_caches = stage_caches(config, self.method)  # {stage index: TeacherCache}
        if teachers is not None:
            self.teachers = dict(teachers)
        elif len(self.stage_caches) < len(self.method.stages):
            self.teachers = load_teachers(config, self.mesh)
        else:  # every stage trains from a cache: no teacher is loaded
            weights = {n: teacher_weight(s) for n, s in teacher_specs(config).items()}
            self.teachers = next(iter(self.stage_caches.values())).teachers(weights)
        if self.stage_caches:
            _check_cache_run(config)
        first_teacher = next(iter(self.teachers.values()))[0]
        stage_lib.validate_chain(self.method, list(self.teachers))
        # Chain models (e.g. a teacher assistant): derived now for their shapes; re-derived from their
        # source's trained parameters when their first stage starts; a teacher of later stages once trained.
        self.chain: dict[str, Model] = {}
        self.trained: dict[str, Any] = {}
        for spec in self._chain_specs():
            self.chain[spec.name] = self._derive(spec.name)
        self.compression = None
        rate = float(_cfg_get(_cfg_get(config, "vocab_compression"), "rate", 0.0) or 0.0)
        if rate:
            self.compression = build_vocab_compression(config, first_teacher, rate)
        if student is None:
            if self.method.student_from:
                source = self._model(self.method.student_from)
            elif first_teacher.params is None and not _as_dict(_cfg_get(config, "student")).get("path") and \
                    student_kwargs(config, self.method)[0] != "random":
                # A student that copies teacher layers reads them from the checkpoint once, here.
                source = next(iter(self.stage_caches.values())).init_teacher(
                    **teacher_load_kwargs(next(iter(teacher_specs(config).values()))))
            else:
                source = first_teacher
            student = build_student(config, source, self.method, compression=self.compression)
            del source
        self.student = student
        self.student_rules: Optional[dict] = None
        self.teacher_rules: dict[str, dict] = {}
        self._teacher_shardings: dict[str, Any] = {}
        if self.sharded:
            self._place_teachers()
        self.train_cfg = _cfg_get(config, "train", ml_collections.ConfigDict())
        self._runners: dict[int, StageRunner] = {}
        self._stage_student: dict[int, Model] = {}
        self.vocab_map = self.compression.slice_teacher_logits if self.compression is not None else None
        if self.compression is None:
            self.vocab_map = self._align_vocabularies()
        for i, stage in enumerate(self.method.stages):
            for t_name, (teacher, _) in self._stage_teachers(i).items():
                if i in self.stage_caches:  # before any compile: terms a cached top-k cannot serve
                    stage_lib.check_cached_stage(self.method, stage, teacher.graphdef)
                terms_lib.validate_terms(stage.terms, self._student_config_for(i), teacher.config,
                                                                  vocab_map=self.vocab_map is not None)

    def _align_vocabularies(self):
        """The teacher-logit map for a head padded beyond the shared tokenizer (one log line), None when the
        vocabularies agree; a one-line error when the tokenizers differ and no term compares across them."""
        from kdjax import knowledge as _knowledge  # noqa: F401  (registers the built-in kinds)
        from kdjax import vocab as vocab_lib
        from kdjax.knowledge import registry
        cross = any(registry.get(t.fn).cross_vocab for stage in self.method.stages for t in stage.terms
                    if t.fn in registry.KNOWLEDGE)
        student_tok = _override_tokenizer(_cfg_get(_cfg_get(self.config, "student"), "tokenizer"),
                                          self.student.tokenizer)
        self.tokenizers = {"student": student_tok}
        maps = set()
        for name, spec in teacher_specs(self.config).items():
            if name not in self.teachers:
                continue
            teacher = self.teachers[name][0]
            teacher_tok = _override_tokenizer(spec.get("tokenizer"), teacher.tokenizer)
            self.tokenizers[name] = teacher_tok
            try:
                fn = vocab_lib.align_vocabularies(teacher.config.vocab_size, self.student.config.vocab_size,
                                                  teacher_tok, student_tok, cross_tokenizer=cross)
            except ValueError as e:
                raise ConfigError(f"teacher {name!r}: {e}") from None
            if fn is not None:
                log.info("teacher %r: logits sliced from %d to %d rows (padded head, same %d-token tokenizer)",
                         name, teacher.config.vocab_size, fn.width, len(teacher_tok))
            maps.add(fn)
        if len(maps) > 1:
            raise ConfigError("the teachers' heads are padded differently; give every teacher the same vocab size")
        return maps.pop() if maps else None

    # ----------------------------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        """Whether the run lays its arrays out on a mesh of more than one device."""
        return self.mesh is not None and self.mesh.size > 1

    def _place_teachers(self) -> None:
        """Validates every model's rules against the mesh and puts the teachers' weights in their layout."""
        from kdjax import sharding as sharding_lib
        self.student_rules = sharding_lib.validate_rules(model_rules(self.config, "student"), self.mesh)
        placed = {}
        for name, (teacher, weight) in self.teachers.items():
            rules = sharding_lib.validate_rules(model_rules(self.config, "teacher", name), self.mesh)
            self.teacher_rules[name] = rules
            shardings = sharding_lib.param_shardings(teacher.params, self.mesh, rules)
            self._teacher_shardings[name] = shardings
            params = jax.device_put(teacher.params, shardings)  # a no-op for weights loaded in this layout
            placed[name] = (Model(teacher.config, teacher.graphdef, params, teacher.tokenizer, source=teacher.source,
                                  id2label=teacher.id2label), weight)
        self.teachers = placed

    @property
    def num_stages(self) -> int:
        return len(self.method.stages)

    def _stage_teachers(self, index: int) -> dict[str, tuple[Model, float]]:
        """The teachers of stage `index`: config teachers (cached top-k in their place for a cache-backed
        stage; the graphdef then says where in the batch) and the chain models trained before it."""
        stage = self.method.stages[index]
        teachers = self.teachers
        if index in self.stage_caches:
            teachers = self.stage_caches[index].teachers({n: w for n, (_, w) in self.teachers.items()})
        names = stage_lib.chain_teachers(self.method, index, list(teachers))
        weights = {m.name: m.weight for m in self.method.models}
        return {name: teachers[name] if name in teachers else (self.chain[name], weights[name])
                for name in stage_lib.stage_teachers(stage, names)}

    def _student_config_for(self, index: int):
        return stage_lib.stage_student_config(self.method.stages[index], self.trainee(index).config)

    # ----------------------------------------------------------------------------------------------
    # Chains: models trained by one stage and distilled from by later ones (docs/architecture.md).
    def _chain_specs(self) -> list:
        """`Method.models` in the order their first stages run."""
        first = {m.name: min(i for i, s in enumerate(self.method.stages) if s.trains == m.name)
                 for m in self.method.models}
        return sorted(self.method.models, key=lambda m: first[m.name])

    def _model(self, name: str) -> Model:
        """A config teacher, or a chain model with its trained parameters once it has them."""
        if name in self.teachers:
            return self.teachers[name][0]
        model = self.chain[name]
        if name in self.trained:
            model = Model(model.config, model.graphdef, self.trained[name], model.tokenizer, source=model.source,
                          id2label=model.id2label)
        return model

    def _derive(self, name: str) -> Model:
        """Chain model `name` (or the student) derived from its source's current parameters."""
        first_teacher = next(iter(self.teachers.values()))[0]
        if name == "student":
            source = self._model(self.method.student_from) if self.method.student_from else first_teacher
            return build_student(self.config, source, self.method, compression=self.compression)
        spec = {m.name: m for m in self.method.models}[name]
        source = self._model(spec.derive_from) if spec.derive_from else first_teacher
        layers = stage_lib.chain_layers(spec, source.config.num_layers, self._student_layers())
        return student_from(source, num_layers=layers, init=spec.init, seed=spec.seed, **dict(spec.shape))

    def _student_layers(self) -> int:
        """The student's depth as the config asks for it (chain models default to halfway to it)."""
        init, kw = student_kwargs(self.config, self.method)
        return int(kw.get("num_layers") or (len(init) if not isinstance(init, str) else get(self.config,
                                                                                                 "student.num_layers")))

    def trainee(self, index: int) -> Model:
        """The model stage `index` trains (before its stage head): the student or a chain model."""
        name = self.method.stages[index].trains
        return self.student if name == "student" else self.chain[name]

    def stage_start_params(self, index: int, previous: Optional[step_lib.TrainState] = None):
        """The parameters stage `index` starts from (None: the trainee's own initial ones).

        The previous stage's when it trained the same model; else the model derived afresh from its
        source when that source is a chain model (which has been trained by now)."""
        name = self.method.stages[index].trains
        if previous is not None and index > 0 and self.method.stages[index - 1].trains == name:
            return previous.params
        source = self.method.student_from if name == "student" else {
            m.name: m for m in self.method.models}[name].derive_from
        if source is not None and source in self.chain:
            return self._derive(name).params
        return None

    def end_stage(self, index: int, state: step_lib.TrainState, workdir: Optional[str] = None) -> None:
        """After the last stage that trains a chain model: its parameters become a teacher of later stages,
        and are saved (Hugging Face layout) to `<workdir>/models/<name>` for a resumed run."""
        name = self.method.stages[index].trains
        if name == "student" or any(s.trains == name for s in self.method.stages[index + 1:]):
            return
        model = self.student_model(state, index)
        self.trained[name] = model.params
        if workdir is not None and jax.process_index() == 0:
            from kdjax import fileio
            from kdjax.hub.api import save_pretrained
            directory = fileio.join(workdir, "models", name)
            with fileio.local_staging(directory) as local:
                save_pretrained(model, local)

    def set_trained(self, name: str, params) -> None:
        """Hand chain model `name` its trained parameters (what `fit` does after its last stage)."""
        if name not in self.chain:
            raise ValueError(f"{name!r} is not a chain model of {self.method.name!r}; chain models: "
                             f"{', '.join(self.chain) or 'none'}")
        self.trained[name] = params

    def restore_models(self, workdir: str, stage: int) -> None:
        """On resume at `stage`: load the chain models trained by earlier stages from `<workdir>/models`."""
        from kdjax import fileio
        for spec in self.method.models:
            last = max(i for i, s in enumerate(self.method.stages) if s.trains == spec.name)
            if last >= stage or spec.name in self.trained:
                continue
            directory = fileio.join(workdir, "models", spec.name)
            if not fileio.exists(fileio.join(directory, "config.json")):
                raise ConfigError(f"resuming at stage {stage} needs {spec.name!r}, trained by stage {last}, but "
                                  f"{directory} is missing; start the run again in a fresh workdir")
            template = self.chain[spec.name]
            loaded = load_pretrained(resolve_model_path(directory), dtype=template.config.dtype,
                                     param_dtype=template.config.param_dtype)
            self.trained[spec.name] = params_from_flat(template.params, flat_params(loaded.params),
                                                       template.config.params_dtype)

    def stage_steps(self, index: int) -> int:
        return stage_steps(self.config, self.method.stages[index])

    def teacher_params(self, index: int = 0) -> dict:
        out = {}
        for name in self._stage_teachers(index):
            if name in self.chain and name not in self.trained:
                raise ValueError(f"stage {index} distills from {name!r}, which an earlier stage trains; run the "
                                 f"chain with fit(), or hand it parameters with run.set_trained({name!r}, params)")
            params = self._model(name).params
            if self.sharded and name in self.chain:
                params = jax.device_put(params, self._chain_shardings(name))
            out[name] = params
        return out

    def _chain_shardings(self, name: str):
        if name not in self._teacher_shardings:
            from kdjax import sharding as sharding_lib
            rules = sharding_lib.validate_rules(model_rules(self.config, "teacher", name), self.mesh)
            self.teacher_rules[name] = rules
            self._teacher_shardings[name] = sharding_lib.param_shardings(self.chain[name].params, self.mesh, rules)
        return self._teacher_shardings[name]

    def runner(self, index: int = 0) -> StageRunner:
        if index in self._runners:
            return self._runners[index]
        stage = self.method.stages[index]
        student = self.trainee(index)
        if stage.student_head:
            student = with_head(student, stage.student_head)
        teachers = {name: stage_lib.TeacherEntry(model.graphdef, model.config, weight)
                    for name, (model, weight) in self._stage_teachers(index).items()}
        program = stage_lib.assemble_stage(
            self.method, index, student_graphdef=student.graphdef, student_config=student.config,
            student_params=student.params, teachers=teachers, steps=self.stage_steps(index),
            optimizer=optimizer_settings(self.config), grad_accum=int(get(self.config, "train.grad_accum")),
            vocab_map=self.vocab_map, seed=int(get(self.config, "train.seed")))
        state_shardings = None
        if self.sharded:
            from kdjax import sharding as sharding_lib
            from kdjax.distill.sharded import train_state_layout
            student_shardings = sharding_lib.param_shardings(student.params, self.mesh, self.student_rules)
            _, state_shardings = train_state_layout(program.tx, student.params, student_shardings,
                                                    program.abstract_modules(), self.mesh)
            constrained = sharding_lib.with_activation_constraints(program.step_fn, self.mesh, self.student_rules)
            jitted = _MeshStep(constrained, state_shardings,
                               {t.name: self._teacher_shardings[t.name] if t.name in self.teachers
                                else self._chain_shardings(t.name) for t in program.teachers},
                               sharding_lib.batch_sharding(self.mesh, self.student_rules), self.mesh)
        else:
            jitted = jax.jit(program.step_fn, donate_argnums=0)
        runner = StageRunner(program=program, step_fn=jitted, eval_fn=jax.jit(program.eval_fn),
                             state_shardings=state_shardings)
        self._runners[index] = runner
        self._stage_student[index] = student
        return runner

    # ----------------------------------------------------------------------------------------------
    def init_state(self, stage: int = 0, params=None) -> step_lib.TrainState:
        """A fresh train state for `stage`, starting from `params` (default: the current student)."""
        runner = self.runner(stage)
        student = self._stage_student[stage]
        if params is None:
            params = student.params
        elif _shapes(old := flat_params(params)) != _shapes(fresh := flat_params(student.params)):
            # Params of another head (the configured one, or an earlier stage's, e.g. an MLM pre-training
            # stage before a task stage): keep every tensor of the same name and shape, fresh head otherwise.
            merged = {k: (old[k] if k in old and old[k].shape == v.shape else v) for k, v in fresh.items()}
            params = params_from_flat(student.params, merged, student.config.params_dtype)
        seed = int(get(self.config, "train.seed"))
        rng = jax.random.PRNGKey(seed + 1000 * stage)
        trainable = {"student": params, "modules": runner.program.init_modules(rng)}
        step = jnp.zeros((), jnp.int32)
        init_opt = runner.tx.init
        sh = runner.state_shardings
        if sh is not None:  # on a mesh: every leaf in its layout, the moments created in theirs
            trainable = jax.device_put(trainable, {"student": sh.params, "modules": sh.modules})
            step, rng = jax.device_put(step, sh.step), jax.device_put(rng, sh.rng)
            init_opt = jax.jit(runner.tx.init, out_shardings=sh.opt_state)
        # Copy so that donation of the state never invalidates the caller's (or the model's) arrays.
        trainable = jax.tree.map(jnp.copy, trainable)
        return step_lib.TrainState(step=step, params=trainable["student"], modules=trainable["modules"],
                                                              opt_state=init_opt(trainable), rng=rng)

    def train_step(self, state: step_lib.TrainState, batch: Mapping[str, Any], stage: int = 0):
        """One jitted step of `stage`; returns the new state and `{name: (sum, count)}` metrics.

        A stage's data hook (`kdjax.distill.hooks.DataHook`) rewrites the batch first, on the host, with a
        generator seeded by (seed, stage, step)."""
        runner = self.runner(stage)
        hook = runner.stage.data_hook
        extra: tuple = ()
        if hook is not None:
            step = int(jax.device_get(state.step))
            rng = hook_rng(int(get(self.config, "train.seed")), stage, step)
            before = set(batch)
            batch = hook(self, state, batch, rng, stage=stage, step=step)
            extra = tuple(sorted(set(batch) - before))
        return runner.step_fn(state, self.teacher_params(stage), self.prepare_batch(batch, extra))

    def host_state(self) -> dict:
        """JSON-able state of the stages' data hooks, stored in every checkpoint's metadata."""
        return {str(i): s.data_hook.state_dict() for i, s in enumerate(self.method.stages) if s.data_hook is not None}

    def restore_host_state(self, state: Optional[Mapping[str, Any]]) -> None:
        for key, value in dict(state or {}).items():
            hook = self.method.stages[int(key)].data_hook
            if hook is not None:
                hook.load_state_dict(value)

    def evaluate_batch(self, state: step_lib.TrainState, batch: Mapping[str, Any], stage: int = 0):
        runner = self.runner(stage)
        hook = runner.stage.data_hook
        extra: tuple = ()
        if hook is not None and getattr(hook, "evaluation", False):
            # A hook that only re-encodes the batch (no sampling, no state), e.g. the cross-tokenizer one.
            before = set(batch)
            batch = hook(self, state, batch, None, stage=stage, step=0)
            extra = tuple(sorted(set(batch) - before))
        return runner.eval_fn(state.params, state.modules, self.teacher_params(stage), self.prepare_batch(batch, extra))

    def prepare_batch(self, batch: Mapping[str, Any], extra: Sequence[str] = ()) -> dict:
        """The fields the step reads (plus `extra`: fields a data hook added), as device arrays."""
        cached = tuple(f for c in self.stage_caches.values() for f in c.fields)
        keep = ("input_ids", "attention_mask", "token_type_ids", "labels", "position_ids", "student_input_ids",
                "student_labels", "student_attention_mask", *cached, *extra)
        out = {k: jnp.asarray(v) for k, v in batch.items() if k in keep}
        if self.student.config.type_vocab_size == 0 and all(m.config.type_vocab_size == 0 for m, _ in self.teachers.values()):
            out.pop("token_type_ids", None)
        if self.compression is not None:
            # The teacher reads original ids; the student reads (and predicts) remapped ones.
            out["student_input_ids"] = self.compression.remap_ids(out["input_ids"])
            if "labels" in out and out["labels"].shape == out["input_ids"].shape:
                out["student_labels"] = self.compression.remap_ids(out["labels"])
        return out

    def student_model(self, state: step_lib.TrainState, stage: Optional[int] = None) -> Model:
        """The student `Model` holding `state`'s parameters (for export and evaluation)."""
        stage = self.num_stages - 1 if stage is None else stage
        self.runner(stage)
        base = self._stage_student[stage]
        return Model(base.config, base.graphdef, state.params, base.tokenizer, source=base.source,
                                  id2label=base.id2label)

    def fit(self, workdir: Optional[str] = None, **kwargs) -> dict:
        from kdjax.distill.trainer import fit
        return fit(self, workdir or self.workdir or _cfg_get(self.config, "workdir", "workdir/run"), **kwargs)
