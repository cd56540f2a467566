"""configs/scale_moe.py describes a valid 235B MoE teacher and 8B student whose params shard (no compile)."""

import jax
import numpy as np

from configs import scale_moe
from kdjax import plan as P
from kdjax import sharding as S
from kdjax.hub.api import abstract_model, flat_params


def test_scale_moe_config_is_valid_and_shards_on_an_expert_mesh():
    config = scale_moe.get_config()
    student, teachers, weights = P.models_from_config(config)
    teacher = teachers["teacher"]
    assert teacher.model_type == "qwen3_moe" and teacher.num_experts == 128 and teacher.num_experts_per_tok == 8
    assert 234e9 < teacher.num_params() < 236e9 and 8.0e9 < student.num_params() < 8.4e9
    assert student.vocab_size == teacher.vocab_size and weights == {"teacher": 1.0}
    assert config.mesh.axes == ("data", "fsdp", "tensor", "expert")
    # Abstract teacher (no weights): every parameter gets a strict spec on a small mesh with the same axes.
    graphdef, abstract = abstract_model(teacher)
    assert sum(int(np.prod(v.shape)) for v in flat_params(abstract).values()) == teacher.num_params()
    mesh = S.make_mesh(S.MeshConfig(axes=config.mesh.axes, ici=(1, 1, 2, 4)))
    rules = S.merge_rules(S.DEFAULT_TEACHER_RULES, config.teacher.rules)
    specs = flat_params(S.param_specs(abstract, mesh, rules, strict=True))
    assert tuple(specs["layers/moe/gate"]) == (None, "expert", "fsdp", "tensor")
    assert tuple(specs["layers/moe/down"]) == (None, "expert", "tensor", "fsdp")
    student_rules = S.merge_rules(S.DEFAULT_STUDENT_RULES, config.student.rules)
    S.param_specs(abstract_model(student)[1], mesh, student_rules, strict=True)
    assert jax.device_count() == 8
