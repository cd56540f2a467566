"""Test set-up: eight fake CPU devices (before jax is imported) and offline hubs."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
# The suite's programs are tiny, so compiling them costs far more than running them: skip XLA's LLVM
# optimization passes (about 40% less compile time; HLO passes such as fusion, layout and sharding still run, so
# numerics and memory plans are those of a normal build). Subprocesses (CLI tests) inherit the setting.
# Modules that compile for real TPU topologies, read compiled-program analyses or compare with values recorded
# from fully optimized programs (the engine's golden recipes) get the full pipeline back
# (FULL_OPTIMIZATION_MODULES below); `KDJAX_TEST_FULL_OPT=1 make test` runs everything fully optimized.
if os.environ.get("KDJAX_TEST_FULL_OPT") != "1":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# Many tests compile the same small programs (a tiny model's step, its forward, the optimizer update) in
# different test processes and CLI subprocesses: one persistent compilation cache per test session, shared
# by the pytest-xdist workers and the subprocesses they start, compiles each of them once (about 10% of the
# suite's time). The session's first process makes it and removes it at the end; `KDJAX_TEST_COMPILE_CACHE=0`
# turns it off. The compile options are part of a cached program's key, so fully optimized modules (below) get
# their own entries; a program loaded from the cache differs from a fresh compile only in its source metadata.
_SESSION_CACHE = None
if os.environ.get("KDJAX_TEST_COMPILE_CACHE", "1") == "1" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _SESSION_CACHE = tempfile.mkdtemp(prefix="kdjax-test-jit-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        import shutil
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# `make test-fast` runs `-m "not slow"`. End-to-end runs, notebooks, AOT plans, multi-device compiles and
# reference-parity tests are slow as whole modules; elsewhere single tests are named. Re-measure with
# `pytest tests --durations=30` after adding a heavy test, and list it here (or mark it in its file).
SLOW_MODULES = {
    "test_benchmarks", "test_chunked_step", "test_hub_parity", "test_notebook", "test_notebooks_more",
    "test_observability", "test_plan", "test_recipes_run", "test_sharded_run", "test_sharded_step",
    "test_streaming_load", "test_tpu_scripts", "test_vocab_engine",
    # Whole-engine runs of every recipe, model families against transformers, generation, caches, plans:
    "test_engine_golden", "test_engine_v2", "test_families", "test_generate", "test_cache", "test_cache_train", "test_roofline",
    "test_scale_moe", "test_activation_sharding", "test_gkd_rail_kd", "test_gkd_annealing_kd",
    "test_gkd_continuation_kd", "test_gkd_alp_kd", "test_gkd_sid", "test_gkd_uncertainty", "test_gkd_mt_bert",
    "test_gkd_theseus", "test_gkd_lrc_bert", "test_cross_tokenizer", "test_onpolicy_run",
    "test_gkd_pd", "test_gkd_ckd", "test_gkd_universal_kd", "test_gkd_mgskd", "test_gkd_diito",
    "test_gkd_takd", "test_gkd_dgkd", "test_gkd_rl_kd", "test_benchmark_methods",
}
FULL_OPTIMIZATION_MODULES = {"test_engine_golden", "test_plan", "test_profile", "test_roofline", "test_scale_moe", "test_activation_sharding",
                             "test_benchmarks", "test_benchmark_latency"}

SLOW_TESTS = {
    "test_distill.py": {"test_step_trains_student_not_teacher_and_compiles_once", "test_grad_accumulation_matches_full_batch",
                        "test_projection_is_trained_and_not_exported", "test_multi_teacher_ensemble_weights",
                        "test_nan_loss_stops_and_keeps_last_good_checkpoint",
                        "test_sigkill_then_rerun_resumes_to_identical_metrics", "test_bf16_teacher_runs_in_the_step"},
    "test_evaluate.py": {"test_cli_evaluates_a_run_from_config_and_checkpoint", "test_cli_task_mode_prints_metrics_json"},
    "test_benchmark_latency.py": {"test_cli_prints_both_batch_sizes_and_json_is_consistent",
                                  "test_real_teacher_against_two_layer_student"},
    "test_profile.py": {"test_benchmark_step_profile_reports_the_split",
                        "test_kd_step_profile_counts_the_teacher_flops_of_its_architecture",
                        "test_training_traces_the_configured_steps_into_the_workdir"},
}


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        module = item.path.stem
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _full_optimization_for_compiled_analyses(request):
    """Planner, roofline and benchmark tests compile with XLA's whole pipeline (see the top of this file),
    in this process and in the subprocesses they start."""
    if request.path.stem not in FULL_OPTIMIZATION_MODULES or not jax.config.read("jax_disable_most_optimizations"):
        yield
        return
    env = os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)
        if env is not None:
            os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = env
