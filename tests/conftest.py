"""Test set-up: eight fake CPU devices (before jax is imported) and offline hubs."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


# `make test-fast` runs `-m "not slow"`. End-to-end runs, notebooks, AOT plans, multi-device compiles and
# reference-parity tests are slow as whole modules; elsewhere single tests are named. Re-measure with
# `pytest tests --durations=30` after adding a heavy test, and list it here (or mark it in its file).
SLOW_MODULES = {
    "test_benchmarks", "test_chunked_step", "test_hub_parity", "test_notebook", "test_notebooks_more",
    "test_observability", "test_plan", "test_recipes_run", "test_sharded_run", "test_sharded_step",
    "test_streaming_load", "test_tpu_scripts", "test_vocab_engine",
    # Whole-engine runs of every recipe, model families against transformers, generation, caches, plans:
    "test_engine_golden", "test_engine_v2", "test_families", "test_generate", "test_cache", "test_roofline",
    "test_scale_moe", "test_activation_sharding", "test_gkd_rail_kd", "test_gkd_annealing_kd",
    "test_gkd_continuation_kd", "test_gkd_alp_kd", "test_gkd_sid", "test_gkd_uncertainty", "test_gkd_mt_bert",
    "test_gkd_theseus", "test_gkd_lrc_bert", "test_gkd_takd", "test_gkd_dgkd", "test_gkd_rl_kd",
}
SLOW_TESTS = {
    "test_distill.py": {"test_step_trains_student_not_teacher_and_compiles_once", "test_grad_accumulation_matches_full_batch",
                        "test_projection_is_trained_and_not_exported", "test_multi_teacher_ensemble_weights",
                        "test_nan_loss_stops_and_keeps_last_good_checkpoint",
                        "test_sigkill_then_rerun_resumes_to_identical_metrics", "test_bf16_teacher_runs_in_the_step"},
    "test_evaluate.py": {"test_cli_evaluates_a_run_from_config_and_checkpoint", "test_cli_task_mode_prints_metrics_json"},
    "test_benchmark_latency.py": {"test_cli_prints_both_batch_sizes_and_json_is_consistent",
                                  "test_real_teacher_against_two_layer_student"},
}


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        module = item.path.stem
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)
