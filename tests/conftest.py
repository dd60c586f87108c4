"""Shared fixtures: tiny random Hugging Face models saved with `save_pretrained`, and their zipjax conversions; the
shipped checkpoints, loaded once per process; the suite's tiers (markers) and its compilation cache.

Eight fake CPU devices are requested before jax is imported so the sharding tests can build a 2x4 mesh; every other
test runs on the first device as usual.

Programs compile without LLVM's expensive optimizations (jax's own `JAX_DISABLE_MOST_OPTIMIZATIONS`, as jax's test
suite runs; inherited by the commands the tests start): most of a test is XLA:CPU compiling small programs, which
this halves (the digits harness and numpy fidelity tests: backend compile 77 -> 40 s), while what the tests check is
unchanged: it is codegen effort, not semantics, and the ahead-of-time TPU and H100 memory plans the AOT tests read
are identical with and without it (a 1-layer LLaMA-3-8B ZipCache serving step: temporaries, totals, bytes, FLOPs
and collectives equal on v5e:2x2 and H100). Set JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test fully optimized code.

Tiers: `pytest_collection_modifyitems` marks tests by file and name (MARKS below), so a change is checked in minutes
with `-m "not aot and not multihost and not subprocess and not real_weights and not slow"` while CI runs everything.
Compiled programs go to jax's persistent compilation cache (under pytest's cache folder, or a temporary folder
with `-p no:cacheprovider`), so a program that a later module compiles again after the per-module cache clear is
read from disk; programs compiled ahead of time for a TPU or a GPU are never written there (see _compilation_cache).
Slowest modules are handed out first (LONGEST_FIRST), so the two xdist workers finish together.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import dataclasses
import gc
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from zipjax.convert import convert

import zipjax  # first: it picks the CPU backend before anything else imports jax (zipjax.platform)

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)

# name -> Hugging Face model builder (seeded, float32)
TINY_MODELS = {
    "llama_gqa": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "llama3_rope": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE)),
    "mistral_window": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=8)),
}


@dataclasses.dataclass
class Tiny:
    name: str
    hf: torch.nn.Module
    hf_dir: Path
    zj_dir: Path

    def load(self, **kwargs) -> zipjax.Model:
        return zipjax.load(self.zj_dir, **kwargs)


def build_tiny(name: str, root: Path) -> Tiny:
    torch.manual_seed(0)
    hf = TINY_MODELS[name]().eval()
    hf_dir, zj_dir = root / f"{name}_hf", root / f"{name}_zj"
    hf.save_pretrained(hf_dir)
    convert(hf_dir, zj_dir, progress=False)
    return Tiny(name, hf, hf_dir, zj_dir)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Tiny]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny(name, root) for name in TINY_MODELS}


@pytest.fixture(params=list(TINY_MODELS))
def tiny(request, tiny_models) -> Tiny:
    return tiny_models[request.param]


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 256) -> np.ndarray:
    """Token ids that avoid the special ids 0-2."""
    return np.random.RandomState(seed).randint(3, vocab, (batch, length))


def has_primitive(jaxpr, primitive: str = "pallas_call") -> bool:
    """Whether a jaxpr runs a Pallas kernel (or `primitive`), looking into nested jaxprs (jit, cond branches, loop
    bodies, shard_map)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and has_primitive(inner, primitive):
                    return True
    return False


def teacher_forced(model, cache, ids, prompt_len: int):
    """Logits of the prompt's last token, then of each later token fed one at a time: ([batch, steps, vocab], the
    cache after them). Positions count from each sequence's start slot (left padding)."""
    starts = np.asarray(cache.starts)
    positions = np.maximum(np.arange(ids.shape[1], dtype=np.int32)[None] - starts[:, None], 0).astype(np.int32)
    logits, cache = model.apply(ids[:, :prompt_len], positions[:, :prompt_len], cache)
    out = [logits[:, -1]]
    for t in range(prompt_len, ids.shape[1] - 1):
        logits, cache = model.apply(ids[:, t:t + 1], positions[:, t:t + 1], cache)
        out.append(logits[:, 0])
    return np.stack(out, 1), cache


def hf_greedy(hf, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0, eos_token_id=None) -> np.ndarray:
    """transformers' greedy generate on left-padded prompts: [batch, max_prompt + max_new_tokens] (or shorter)."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=pad_id, eos_token_id=eos_token_id)
    return out.numpy()


@pytest.fixture(scope="session")
def stdlib_llama() -> zipjax.Model:
    """checkpoints/stdlib-llama (the CLI's default model), loaded once per process: a Model is frozen, so the test
    modules that use it share one."""
    return zipjax.load(CHECKPOINTS / "stdlib-llama")


@pytest.fixture(scope="session")
def digits_emu3() -> zipjax.Model:
    """checkpoints/digits-emu3 (the ZipAR quality harness's Emu3 model), loaded once per process."""
    return zipjax.load(CHECKPOINTS / "digits-emu3")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs(request):
    """Free each module's compiled programs when it ends. Every XLA:CPU executable holds its own memory mappings,
    and a whole suite's worth of them exhausts the kernel's per-process limit (vm.max_map_count, 65530): LLVM then
    fails with "Cannot allocate memory" although RAM is free. The persistent compilation cache makes a later
    module's recompile of the same program a disk read. A module that compiles for a TPU or a GPU ahead of time
    writes nothing to that cache: those executables are large, and only the chip they target could load them."""
    import jax

    ahead_of_time = request.node.path.name in _files_marked("aot")
    if ahead_of_time:
        threshold = jax.config.jax_persistent_cache_min_compile_time_secs
        jax.config.update("jax_persistent_cache_min_compile_time_secs", NEVER_CACHED)
    yield
    if ahead_of_time:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
    jax.clear_caches()
    gc.collect()


# ------------------------------------------------------------------------------------------------ tiers

# marker -> the tests it applies to: a whole file ("test_x.py") or one test function ("test_x.py::test_name", all
# its parametrizations). Registered (with what each means) in pyproject.toml's [tool.pytest.ini_options].
MARKS: dict[str, tuple[str, ...]] = {
    "aot": (
        "test_aot.py",
        "test_aot_delta.py",
        "test_aot_quantized.py",
        "test_aot_zipar.py",
        "test_serve_aot.py",
        "test_pallas_paged.py::test_compiles_at_llama3_8b_decode_shapes",
        "test_pallas_paged_dense.py::test_the_serving_step_compiles_for_an_h100_through_the_kernel",
        "test_serve_mesh.py::test_llama_3_70b_serving_step_splits_its_pools_sixteen_ways_on_v5e_4x4",
        "test_flash_kernel.py::test_compiles_ahead_of_time",
        "test_pod.py::test_8b_decode_step_compiles_for_multi_host_topologies",
        "test_pod.py::test_quick_mode_runs_end_to_end",
        "test_pod.py::test_sequence_split_cache_attends_in_place_on_a_1x16_mesh",
        "test_pod.py::test_zipcache_decode_runs_the_packed_code_kernel_per_shard_on_v5e_2x2",
        "test_pod_emu3.py::test_a_zipar_pass_over_the_band_cache_compiles_for_v6e",
    ),
    "multihost": ("test_multihost.py",),
    "subprocess": (
        "test_multihost.py",
        "test_convert.py::test_cli_console_script_end_to_end",
        "test_default_checkpoint.py::test_cli_generates_from_the_default_checkpoint",
        "test_hostile.py::test_a_checkpoint_carrying_tokenizer_code_runs_none_of_it_and_never_prompts",
        "test_hostile.py::test_a_tokenizer_only_code_could_build_is_refused_by_name",
        "test_hostile.py::test_convert_of_a_folder_with_tokenizer_code_runs_none_of_it",
        "test_hostile.py::test_a_decompression_bomb_is_refused_from_its_header",
        "test_hostile.py::test_argument_errors_are_one_line",
        "test_hostile.py::test_cli_errors_are_one_line",
        "test_hostile.py::test_a_non_utf8_prompt_is_one_error_line_and_the_prompt_is_not_echoed_first",
        "test_hostile.py::test_a_closed_pipe_ends_quietly",
        "test_hostile.py::test_a_pickle_refusal_never_suggests_unsafe_loading",
        "test_hostile.py::test_os_errors_about_the_users_paths_are_one_line",
        "test_structure.py::test_every_module_imports_alone_in_a_fresh_process",
        "test_structure.py::test_a_kernel_module_imports_alone_in_a_fresh_interpreter",
        "test_structure.py::test_only_zipjax_is_a_top_level_import_name",
        "test_first_contact.py",
        "test_readme.py::test_the_readme_task_snippets_run",
        "test_hostile_runtime.py::test_a_closed_stdout_is_one_line",
        "test_hostile_runtime.py::test_a_full_disk_during_export_is_one_line",
        "test_tokenizer_fast.py::test_the_generate_command_on_the_shipped_checkpoint_imports_no_transformers",
        "test_serve_api.py::test_the_serve_command_serves_and_stops_cleanly_on_sigint_and_sigterm",
        "test_hostile_runtime.py::test_a_disk_that_fills_during_the_write_is_one_line_and_keeps_the_old_folder",
        "test_hostile_runtime.py::test_free_memory_counts_the_address_space_limit",
    ),
    "real_weights": ("test_smollm2.py",),
    # about 15 s or more each on 2 busy cores (the fast tier's --durations, 2026-12-05), and the fast tier's tests of
    # 8 s or more in the full run of 2026-12-06 (--junitxml, contended): end-to-end generation with every KV method,
    # image decoding, experts, engines on a mesh, interpreted multi-query kernels; besides the tests marked slow
    # where they are written
    "slow": (
        "test_serve_engine.py::test_a_small_pool_preempts_and_outputs_do_not_change",
        "test_pallas_paged_dense.py::test_the_model_step_through_the_kernel_gives_the_jnp_tokens",
        "test_serve_engine.py::test_prefix_cache_hits_and_outputs_equal_a_run_without_it",
        "test_serve_engine.py::test_cancelling_frees_the_pages",
        "test_serve_engine.py::test_seeded_sampling_is_the_same_alone_and_under_load",
        "test_serve_api.py::test_fuzzed_completion_bodies_get_an_answer_or_openais_error_body_never_a_crash",
        "test_serve_api.py::test_16_concurrent_streams_each_equal_their_single_request_output",
        "test_attention.py::test_causal_attention_is_differentiable_with_the_dense_gradient",
        "test_default_checkpoint.py::test_heldout_perplexity_is_reproduced",
        "test_digits_harness.py::test_digits_with_a_quantized_kv_cache",
        "test_digits_harness.py::test_generated_digits_are_recognisable",
        "test_emu3.py::test_cli_image_and_ask",
        "test_emu3.py::test_greedy_image_tokens_match_transformers_generate",
        "test_emu3.py::test_image_layout_and_pass_count",
        "test_emu3_convert.py::test_baai_layout_gives_the_same_model",
        "test_experts.py::test_generate_matches_solo_runs_and_a_new_mix_does_not_recompile",
        "test_experts.py::test_mesh_2x4_equals_one_device",
        "test_experts.py::test_zipcache_mixed_batch_equals_each_request_alone",
        "test_experts_fixture.py::test_compressed_experts_near_lossless",
        "test_generate.py::test_stream_yields_exactly_what_generate_returns",
        "test_kivi.py::test_kivi_tracks_the_dense_cache_and_the_kernel_equals_the_jnp_path",
        "test_kivi.py::test_prefill_and_decode_residuals_by_hand",
        "test_kv.py::test_cli_generates_with_a_quantized_cache",
        "test_kv.py::test_generate_with_a_quantized_cache",
        "test_kv.py::test_pallas_decode_attention_equals_the_jnp_path",
        "test_kv.py::test_streaming_8_bit_caches_track_the_dense_cache",
        "test_minicache.py::test_decode_tokens_are_merged_at_the_second_layer_of_a_pair",
        "test_minicache.py::test_merged_cache_generates_counts_bytes_and_refuses_bad_configurations",
        "test_pod.py::test_generate_profile_flag_writes_a_trace",
        "test_serve_api.py::test_experts_are_model_ids_and_each_request_runs_on_its_own",
        "test_sharding.py::test_zipvl_and_minicache_caches_are_split_and_generate_on_a_mesh",
        "test_zipar.py::test_adaptive_layout_and_pass_bounds",
        "test_zipar.py::test_pallas_kernel_path_gives_the_same_image",
        "test_zipvl.py::test_generate_with_zipvl_and_bad_configurations",
        "test_zipvl.py::test_one_important_set_per_layer_shared_by_heads_unless_per_head",
        "test_zipvl.py::test_sparse_prefill_over_a_dense_cache",
        "test_ask_kv.py::test_ask_with_each_cache",
        "test_ask_kv.py::test_zipvl_reports_its_important_tokens_per_layer_for_image_and_text",
        "test_attention.py::test_chunked_prompt_pass_equals_one_pass",
        "test_cli_generate.py::test_a_router_trained_from_the_cli_routes_auto",
        "test_cli_generate.py::test_the_status_says_the_kv_bytes_and_the_routed_expert",
        "test_emu3.py::test_eval_shape_over_the_real_emu3_gen_config",
        "test_emu3_convert.py::test_bfloat16_is_bit_exact",
        "test_fidelity_numpy.py::test_zipvl_decode_block_is_ranked_by_the_current_query_over_the_window",
        "test_hostile_files.py::test_memory_bombs_are_refused_in_bounded_memory",
        "test_kv.py::test_a_segment_shorter_than_tritons_tile_takes_the_reference_state",
        "test_kv.py::test_cli_reads_the_method_registry",
        "test_kv.py::test_probe_saliency_ranks_like_the_exact_score",
        "test_kv.py::test_salient_tokens_get_the_high_bits",
        "test_loadgen.py::test_a_run_against_zipjax_serve_measures_every_request",
        "test_pallas_paged.py::test_ranked_pages_longer_than_a_head_match_the_jnp_path",
        "test_pallas_quantized.py::test_mixed_precision_segments_merge_exactly",
        "test_pallas_quantized.py::test_multi_query_kernel_matches_reference",
        "test_pallas_quantized.py::test_multi_query_merged_with_a_dense_band_is_attention_over_both",
        "test_pallas_quantized.py::test_multi_query_tiles_cross_blocks",
        "test_serve_api.py::test_greedy_text_equals_generate_streamed_and_not",
        "test_serve_engine.py::test_greedy_outputs_equal_generate_with_more_requests_than_slots",
        "test_serve_mesh.py::test_a_model_loaded_on_a_mesh_is_served_on_it",
        "test_serve_mesh.py::test_greedy_tokens_on_a_2x4_mesh_equal_one_devices",
        "test_serve_packed.py::test_page_local_saliency_and_packing_equal_numpy",
        "test_serve_packed.py::test_zipcache_tokens_do_not_depend_on_batch_mates_or_chunking",
        "test_serve_ragged.py::test_the_step_mapped_onto_jax_reference_equals_the_jnp_paged_path",
        "test_sharding.py::test_quantized_cache_is_split_and_generates_on_a_mesh",
        "test_zipar.py::test_parallel_decoding_layout",
        "test_zipar.py::test_sjd_kernel_path_gives_the_same_image",
        "test_zipar.py::test_speculative_jacobi_decoding_peer",
        "test_zipar.py::test_window_of_a_row_reproduces_sequential_decoding",
        "test_zipar_kv.py::test_band_attention_by_the_kernel_equals_the_jnp_path",
        "test_zipar_kv.py::test_band_attention_by_the_kernel_per_shard_of_a_mesh",
        "test_zipar_kv.py::test_band_cache_in_row_order_holds_what_the_sequential_cache_holds",
        "test_zipar_kv.py::test_kivi_band_attention_by_the_kernel_equals_the_jnp_path",
        "test_zipar_kv.py::test_kivi_band_in_row_order_holds_what_the_sequential_kivi_cache_holds",
        "test_zipvl.py::test_eviction_keeps_p_tokens_per_head_within_the_static_room",
        "test_zipvl.py::test_mixed_precision_stores_every_token_once",
        "test_ask_kv.py::test_the_model_answers_heldout_digits_well_above_chance",
        "test_default_checkpoint.py::test_a_version_1_checkpoint_loads_heads_first_and_saves_as_version_2",
        "test_emu3_convert.py::test_sharded_safetensors_convert_identically",
        "test_experts.py::test_mixed_batch_through_the_cache_equals_each_request_alone",
        "test_fidelity_numpy.py::test_minicache_retains_by_the_threshold_within_its_room_and_reports_overflow",
        "test_fidelity_numpy.py::test_zipvl_cache_stores_T_at_high_bits_and_the_rest_at_low_bits",
        "test_generate.py::test_sampling",
        "test_hostile_files.py::test_chat_templates_render_under_bounds_and_their_errors_are_one_line",
        "test_kv.py::test_full_precision_window_is_exact",
        "test_minicache.py::test_merged_cache_restores_identical_layers_and_retained_tokens_exactly",
        "test_serve_engine.py::test_a_long_prompt_goes_in_chunks_and_equals_the_unchunked_output",
        "test_serve_mesh.py::test_prompt_logprobs_on_a_2x4_mesh_equal_one_devices",
        "test_sharding.py::test_mesh_gives_the_same_greedy_tokens",
        "test_zipar.py::test_deprecated_arguments_still_choose_the_decoder",
        "test_zipar.py::test_scatter_cache_matches_causal_attention",
        "test_zipar_kv.py::test_kivi_band_gives_each_query_kivis_rule_at_its_slot",
        "test_zipvl.py::test_p_is_monotone_in_tau_and_p1_counts_tokens_with_mass",
    ),
}

# Test files, slowest first (seconds per file in the full run of 2026-12-06 on 2 cores, --junitxml, before that
# session's trims of the slowest files). With `--dist loadfile --no-loadscope-reorder` xdist hands files out in
# collection order, so the long ones start at once and short files fill the gaps; by default it hands them out by
# number of tests, which left the few-test, long-running files (multihost, AOT) to the end.
LONGEST_FIRST: tuple[str, ...] = (
    "test_zipar_kv.py", "test_ask_kv.py", "test_pallas_paged.py", "test_serve_mesh.py", "test_serve_aot.py",
    "test_kv.py", "test_readme.py", "test_pallas_quantized.py", "test_zipar.py", "test_aot.py", "test_serve_api.py",
    "test_zipvl.py", "test_serve_packed.py", "test_hostile.py", "test_aot_quantized.py", "test_emu3.py",
    "test_experts.py", "test_structure.py", "test_smollm2.py", "test_pod.py", "test_multihost.py",
    "test_aot_zipar.py", "test_generate.py", "test_serve_engine.py", "test_pallas_paged_dense.py",
    "test_digits_harness.py", "test_sharding.py", "test_minicache.py",
)


def _files_marked(marker: str) -> set[str]:
    return {entry.partition("::")[0] for entry in MARKS[marker]}


def _check_marks_name_tests(items: list[pytest.Item]) -> None:
    """A renamed test must not leave its tier quietly (a warning: CI runs every tier anyway)."""
    modules = {item.path.name: item.module for item in items if isinstance(item, pytest.Function)}
    for entries in MARKS.values():
        for entry in entries:
            file, _, name = entry.partition("::")
            if name and file in modules and not callable(getattr(modules[file], name, None)):
                warnings.warn(pytest.PytestConfigWarning(f"tests/conftest.py MARKS names {entry}, which {file} "
                                                         "does not define"), stacklevel=1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks (loadgroup) and before -m deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _check_marks_name_tests(items)
    for item in items:
        file, name = item.path.name, getattr(item, "originalname", item.name)
        for marker, entries in MARKS.items():
            if file in entries or f"{file}::{name}" in entries:
                item.add_marker(marker)
    rank = {file: i for i, file in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


# ---------------------------------------------------------------------------------------- compilation cache

NEVER_CACHED = 1e9  # seconds: a compile-time threshold no program reaches
CACHE_OPTION = "zipjax_jax_cache"  # the folder, handed from the xdist controller to its workers
CACHE_BYTES = 4 << 30  # a kept folder past this starts the next run empty


def _compilation_cache(config: pytest.Config) -> str | None:
    """The folder of jax's persistent compilation cache: ZIPJAX_TEST_JAX_CACHE if set ("off": none), else pytest's
    cache folder (kept between runs, so a second run starts warm), else (-p no:cacheprovider) a temporary folder
    for this run. xdist workers use the folder their controller chose."""
    if hasattr(config, "workerinput"):
        return config.workerinput.get(CACHE_OPTION)
    chosen = os.environ.get("ZIPJAX_TEST_JAX_CACHE")
    if chosen:
        return None if chosen == "off" else chosen
    if getattr(config, "cache", None) is not None:
        return _bounded(config.cache.mkdir("jax-compilation-cache"))
    config._zipjax_temporary_cache = tempfile.mkdtemp(prefix="zipjax-jax-cache-")
    return config._zipjax_temporary_cache


def _bounded(folder: Path) -> str:
    """The kept folder, emptied first once it holds more than CACHE_BYTES: the tests write it unbounded (no
    eviction, see pytest_configure), and programs of code since changed pile up there from run to run."""
    if sum(entry.stat().st_size for entry in folder.iterdir() if entry.is_file()) > CACHE_BYTES:
        shutil.rmtree(folder)
        folder.mkdir()
    return str(folder)


@pytest.hookimpl(trylast=True)  # after the cache provider set config.cache
def pytest_configure(config: pytest.Config) -> None:
    import jax

    config._zipjax_cache = folder = _compilation_cache(config)
    if folder is not None:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        # No size bound, so no eviction: with one, jax reads the size and access time of every entry in the folder
        # on each write, and the suite writes thousands of small programs (each eager op is one), which made a
        # write cost a third of a second by the end of a run (quadratic in the number of programs).
        jax.config.update("jax_compilation_cache_max_size", -1)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist: every worker shares the controller's cache folder."""
    node.workerinput[CACHE_OPTION] = node.config._zipjax_cache


def pytest_unconfigure(config: pytest.Config) -> None:
    temporary = getattr(config, "_zipjax_temporary_cache", None)
    if temporary is not None:
        shutil.rmtree(temporary, ignore_errors=True)
