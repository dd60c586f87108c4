"""Property-based fuzzing of every external input: whatever a config file, GGUF metadata, checkpoint manifest,
image file, command line or API argument holds, zipjax either accepts it or raises ZipjaxError (one line on the
command line); never another exception.

Values are drawn from every JSON type (with NaN, infinities, huge and negative numbers, nested containers) and
substituted into valid inputs, so each example breaks one or a few fields of something otherwise well-formed.
"""

import contextlib
import dataclasses
import functools
import io
import json
import math
import shutil
import struct
import zlib
from datetime import timedelta
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from zipjax.convert.hf_config import config_from_hf

import zipjax
from zipjax.cli import build_parser
from zipjax.cli import main as cli_main
from zipjax.config import ModelConfig
from zipjax.emu3.model import Emu3Vision
from zipjax.emu3.png import read_image
from zipjax.sampling import check_settings

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**32 + 3, 2**63, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-310, 0.5, 1e300]),
    st.text(max_size=12), st.sampled_from(["true", "false", "64", "1e-5", "llama", "default"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=8)


def _mutated(base: dict, keys: list[str]):
    """A copy of `base` with one to three of `keys` replaced by arbitrary JSON values (or deleted)."""
    return st.dictionaries(st.sampled_from(keys), st.one_of(json_values, st.just(KeyError)), min_size=1,
                           max_size=3).map(lambda changes: _apply(base, changes))


def _apply(base: dict, changes: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        if value is KeyError:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _accepted_or_refused(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except zipjax.ZipjaxError:
        return None


MANIFEST = json.loads((ROOT / "checkpoints" / "stdlib-llama" / "zipjax.json").read_text())
EMU3_MANIFEST = json.loads((ROOT / "checkpoints" / "digits-emu3" / "zipjax.json").read_text())
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "rope_scaling": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
             "pad_token_id": 0, "hidden_act": "silu", "attention_bias": False, "sliding_window": None,
             "torch_dtype": "float32"}


@FUZZ
@given(_mutated(MANIFEST["config"], [*MANIFEST["config"], "rope"]))
def test_checkpoint_model_config(config):
    result = _accepted_or_refused(ModelConfig.from_dict, config)
    assert result is None or isinstance(result, ModelConfig)


@FUZZ
@given(st.dictionaries(st.sampled_from([*list(MANIFEST["config"]["rope"]), "bogus"]), json_values, max_size=3))
def test_checkpoint_rope_config(changes):
    config = json.loads(json.dumps(MANIFEST["config"]))
    config["rope"].update(changes)
    _accepted_or_refused(ModelConfig.from_dict, config)


@FUZZ
@given(_mutated(EMU3_MANIFEST["emu3"], ["vq_config", "vocab", "image_area"]))
def test_checkpoint_emu3_record(record):
    _accepted_or_refused(Emu3Vision.from_dict, record)


@FUZZ
@given(st.sampled_from(["vq_config", "vocab"]).flatmap(
    lambda part: st.tuples(st.just(part), _mutated(EMU3_MANIFEST["emu3"][part], list(EMU3_MANIFEST["emu3"][part])))))
def test_checkpoint_emu3_fields(part_and_value):
    part, value = part_and_value
    _accepted_or_refused(Emu3Vision.from_dict, {**EMU3_MANIFEST["emu3"], part: value})


@FUZZ
@given(_mutated(HF_CONFIG, [*HF_CONFIG, "rope_parameters", "layer_types", "torch_dtype"]),
       st.one_of(st.none(), _mutated({"eos_token_id": 2, "pad_token_id": 0}, ["eos_token_id", "pad_token_id"])))
def test_hugging_face_config_and_generation_config(tmp_path_factory, config, generation):
    folder = tmp_path_factory.mktemp("hf")
    (folder / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    result = _accepted_or_refused(config_from_hf, folder)
    assert result is None or isinstance(result, ModelConfig)


@FUZZ
@given(st.one_of(st.binary(max_size=64), st.text(max_size=32).map(str.encode)))
def test_config_files_that_are_not_json(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("hf")
    (folder / "config.json").write_bytes(raw)
    _accepted_or_refused(config_from_hf, folder)


GGUF_FIELDS = {"llama.embedding_length": 64, "llama.attention.head_count": 4, "llama.block_count": 2,
               "llama.feed_forward_length": 128, "llama.attention.head_count_kv": 2, "llama.context_length": 128,
               "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0,
               "llama.vocab_size": 256, "tokenizer.ggml.eos_token_id": 2, "llama.rope.scaling.type": "none"}
gguf_values = st.one_of(st.integers(min_value=-(2**31), max_value=2**31 - 1),
                        st.floats(allow_nan=True, allow_infinity=True, width=32), st.text(max_size=8),
                        st.booleans(), st.lists(st.integers(min_value=0, max_value=300), max_size=3))


@FUZZ
@given(st.dictionaries(st.sampled_from(list(GGUF_FIELDS)), gguf_values, min_size=1, max_size=3))
def test_gguf_metadata(tmp_path_factory, changes):
    import gguf
    from zipjax.convert.gguf import _reader, config_from_gguf

    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {**GGUF_FIELDS, **changes}.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_int32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _accepted_or_refused(lambda: config_from_gguf(_reader(path), path, None))


def _png(width: int, height: int, payload: bytes) -> bytes:
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


@FUZZ
@given(st.one_of(
    st.binary(max_size=200),
    st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.binary(max_size=300)).map(lambda a: _png(*a)),
    st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(0, 60), st.binary(min_size=1, max_size=4)).map(
        lambda a: _flip(_png(a[0], a[1], bytes(3 * a[0] * a[1] + a[1])), a[2], a[3])),
))
def test_image_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("img") / "x.png"
    path.write_bytes(data)
    image = _accepted_or_refused(read_image, path)
    assert image is None or (image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3)


def _flip(data: bytes, at: int, junk: bytes) -> bytes:
    at = min(at, len(data) - 1)
    return data[:at] + junk + data[at + len(junk):]


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.none(),
                    st.text(max_size=4), st.booleans())


@FUZZ
@given(numbers, numbers, numbers, numbers)
def test_sampling_settings(temperature, top_k, top_p, seed):
    checked = _accepted_or_refused(check_settings, temperature, top_k, top_p, seed)
    if checked is not None:
        t, _k, p, s = checked
        assert math.isfinite(t) and t >= 0 and (p is None or 0 < p <= 1) and 0 <= s < 2**32


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["llama_gqa"].load()


prompts = st.one_of(
    st.lists(st.lists(st.integers(-5, 300), max_size=6), max_size=3),
    st.lists(st.integers(-(2**70), 2**70), min_size=1, max_size=4),
    st.lists(st.lists(st.one_of(st.integers(0, 255), st.floats(), st.text(max_size=2)), max_size=3), max_size=2),
    st.text(max_size=5), st.none(), st.integers(),
)


@settings(FUZZ, max_examples=40)
@given(prompts, st.one_of(st.integers(-2, 4), st.floats(), st.text(max_size=2)),
       st.sampled_from([dict(), dict(temperature=1.0, top_k=3), dict(temperature=0.7, top_p=0.9)]),
       st.one_of(st.none(), st.integers(-3, 300), st.lists(st.integers(-3, 300), max_size=3), st.text(max_size=3)))
def test_generate_arguments(tiny, prompt_ids, max_new_tokens, sampling, stop_tokens):
    out = _accepted_or_refused(zipjax.generate, tiny, prompt_ids, max_new_tokens, stop_tokens=stop_tokens,
                               **sampling)
    assert out is None or (out.ndim == 2 and out.dtype == np.int32)


FLAGS = {
    "generate": ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--kv", "--dtype",
                 "--checkpoint", "--chat", "--kv-kernel"],
    "image": ["--size", "--cfg-scale", "--temperature", "--top-k", "--top-p", "--seed", "--zipar-window",
              "--zipar-min-window", "--sjd-window", "--out", "--checkpoint", "--negative-prompt"],
    "convert": ["--dtype", "--overwrite", "--vision-tokenizer"],
    "ask": ["--max-new-tokens", "--checkpoint", "--dtype"],
    "export": ["--overwrite"], "verify": [],
}
words = st.one_of(st.text(max_size=8), st.sampled_from(["nan", "-1", "0", "1e309", "99999999999999999999", "8x8",
                                                        "adaptive", "", "bfloat16", "zipcache", "x.png"]))


@settings(FUZZ, max_examples=150)
@given(st.sampled_from(sorted(FLAGS)).flatmap(
    lambda command: st.lists(st.one_of(st.sampled_from(FLAGS[command] or ["x"]), words), max_size=6).map(
        lambda rest: [command, *rest])))
def test_command_line_arguments_parse_or_are_one_error(argv):
    try:
        args = build_parser().parse_args(argv)
    except zipjax.ZipjaxError:
        return
    except SystemExit:  # --help and friends
        return
    if args.command in ("generate", "image"):
        _accepted_or_refused(check_settings, args.temperature, args.top_k, args.top_p, args.seed)


@settings(FUZZ, max_examples=60)
@given(st.sampled_from(["verify", "convert", "export"]), st.lists(words, min_size=1, max_size=3))
def test_commands_on_arbitrary_paths_end_in_a_status_never_a_traceback(tmp_path_factory, command, paths):
    folder = tmp_path_factory.mktemp("cli")
    argv = [command, *[str(folder / p) if p else p for p in paths]]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        status = cli_main(argv)
    assert status in (0, 2), (argv, err.getvalue())
    assert "Traceback" not in err.getvalue()


# ------------------------------------------------------------------ the surfaces added by the second hostile sweep
# (KV method fields, serving's SamplingParams, the CLI's numeric flags, whole checkpoint manifests)

BOUNDED = settings(FUZZ, deadline=timedelta(seconds=60))  # a generous per-example bound: a hang fails, not the suite

field_values = st.one_of(
    json_values, st.integers(-3, 300), st.sampled_from([1, 2, 3, 4, 8, 16, 32, 64, 128, 10**9, 2**40]),
    st.floats(-2.0, 2.0), st.tuples(st.floats(allow_nan=True), st.floats(allow_nan=True)),
    st.tuples(st.integers(-2, 80), st.integers(-2, 80)),
)
STRING_SETTINGS = ["probe", "exact", "code", "token", "head", "distinct", "printed"]


def _typed(field) -> st.SearchStrategy:
    """Values of a method field's annotated type, most of them in range, so that accepted methods are common."""
    from zipjax import kv

    ints = st.sampled_from([1, 2, 3, 4, 8, 16, 32, 64, 100, 128])
    typed = {"int": ints, "int | None": st.one_of(st.none(), ints), "float": st.floats(0.01, 0.99),
             "str": st.sampled_from(STRING_SETTINGS), "bool": st.booleans(),
             "bool | None": st.sampled_from([None, False]),
             "KIVI | Uniform | None": st.sampled_from([None, kv.KIVI(), kv.Uniform()])}
    return typed.get(field.type, st.just(field.default))


def _method_and_fields():
    from zipjax import kv

    def fields_of(name):
        fields = {f.name: f for f in dataclasses.fields(kv.METHODS[name])}
        return st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=2, unique=True).flatmap(
            lambda chosen: st.fixed_dictionaries({f: st.one_of(_typed(fields[f]), field_values) for f in chosen})).map(
            lambda values: (name, values))

    return st.sampled_from(sorted(kv.METHODS)).flatmap(fields_of)


@settings(BOUNDED, max_examples=25)
@given(_method_and_fields())
def test_kv_method_fields_name_the_field_or_make_a_working_cache(tiny, method_and_fields):
    """Every registered KV method with one or two fields set to arbitrary values: refused by a ZipjaxError that
    names a field it was given, or a method whose cache passes generate's checks (geometry, memory) and traces
    through a prefill and the decode loop (jax.eval_shape: nothing is compiled or allocated)."""
    from zipjax import kv
    from zipjax.generate import _generate_loop, _Plan
    from zipjax.kv.methods import CacheRecipe

    name, fields = method_and_fields
    assume(fields.get("kernel") is not True)  # the Pallas kernel, interpreted on a CPU, is slow to trace
    try:
        method = kv.METHODS[name](**fields)
    except zipjax.ZipjaxError as error:
        assert any(field in str(error) for field in fields), (name, fields, str(error))
        return
    plan = _accepted_or_refused(_Plan, tiny, [[3, 4, 5, 6, 7]], 3, 0.0, None, None, 0, None, None, method)
    if plan is None:
        return
    starts = jax.ShapeDtypeStruct((plan.batch,), jnp.int32)
    cache = jax.eval_shape(CacheRecipe(tiny.config, plan.batch, plan.cache_length, plan.kv, plan.bucket), starts)
    tokens, _ = jax.eval_shape(functools.partial(_generate_loop, config=tiny.config, mode=plan.mode), tiny.params,
                               plan.prompt, plan.starts, cache, jax.random.key(0), plan.knobs, jnp.int32(3))
    assert tokens.shape[0] == 1 and tokens.dtype == jnp.int32


@settings(BOUNDED, max_examples=150)
@given(st.dictionaries(st.sampled_from(["max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids",
                                        "ignore_eos", "logprobs", "prompt_logprobs"]),
                       st.one_of(field_values, st.lists(st.integers(-3, 2**40), max_size=3).map(tuple)),
                       min_size=1, max_size=3))
def test_serving_sampling_params_are_valid_or_name_the_field(fields):
    from zipjax.serve.requests import SamplingParams

    try:
        params = SamplingParams(**fields)
    except zipjax.ZipjaxError as error:
        assert any(field in str(error) for field in fields), (fields, str(error))
        return
    valid_int = lambda v, lo: isinstance(v, int) and not isinstance(v, bool) and v >= lo
    assert valid_int(params.max_tokens, 0) and (params.top_k is None or valid_int(params.top_k, 1)), params
    assert isinstance(params.temperature, int | float) and not isinstance(params.temperature, bool), params
    assert math.isfinite(params.temperature) and params.temperature >= 0, params
    assert params.top_p is None or (not isinstance(params.top_p, bool) and 0 < params.top_p <= 1), params
    assert params.seed is None or valid_int(params.seed, 0), params
    assert isinstance(params.stop_token_ids, tuple) and all(valid_int(t, 0) for t in params.stop_token_ids), params
    assert isinstance(params.ignore_eos, bool) and isinstance(params.prompt_logprobs, bool), params
    assert params.logprobs is None or valid_int(params.logprobs, 0), params


NUMERIC_FLAGS = {"generate": ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"],
                 "image": ["--temperature", "--top-k", "--top-p", "--seed", "--size", "--cfg-scale"],
                 "ask": ["--max-new-tokens"]}
numeric_texts = st.one_of(
    st.text(max_size=10), st.integers(-(2**70), 2**70).map(str), st.floats(allow_nan=True).map(repr),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "0", "-0", "0.0", "1", "-1", "1_000", " 7 ", "0x10",
                     "4294967296", "9" * 5000, "8x8", "0x8", "8x0", "-8x8", "16X16", "x", "1e-320", "\u0663"]),
)


@pytest.fixture(scope="module")
def small_png(tmp_path_factory) -> Path:
    from zipjax.emu3.png import write_png

    path = tmp_path_factory.mktemp("png") / "digit.png"
    write_png(path, np.zeros((8, 8, 3), np.uint8))
    return path


@settings(BOUNDED, max_examples=60)
@given(st.sampled_from(sorted(NUMERIC_FLAGS)).flatmap(lambda command: st.tuples(
    st.just(command), st.dictionaries(st.sampled_from(NUMERIC_FLAGS[command]), numeric_texts, min_size=1,
                                      max_size=3))))
def test_numeric_flags_are_one_error_line_or_valid_settings(tmp_path_factory, small_png, command_and_flags):
    """Arbitrary text for each numeric flag: the command ends with status 2 and one `error:` line (an unparsable
    value, a setting out of range, or, with every value valid, the missing checkpoint it was pointed at), and the
    values the parser accepts are valid settings or a ZipjaxError for the run's early check."""
    command, flags = command_and_flags
    folder = tmp_path_factory.mktemp("flags")
    head = {"generate": ["generate", "a prompt"], "image": ["image", "a digit", "--out", str(folder / "x.png")],
            "ask": ["ask", str(small_png), "which digit?"]}[command]
    argv = [*head, "--checkpoint", str(folder / "missing"), *(part for f, v in flags.items() for part in (f"{f}={v}",))]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        status = cli_main(argv)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error:"), (argv, err.getvalue())
    try:
        args = build_parser().parse_args(argv)
    except zipjax.ZipjaxError:
        return
    if command == "ask":
        assert args.max_new_tokens is None or args.max_new_tokens >= 1
        return
    checked = _accepted_or_refused(check_settings, args.temperature, args.top_k, args.top_p, args.seed)
    if checked is not None:
        t, _k, p, s = checked
        assert math.isfinite(t) and t >= 0 and (p is None or 0 < p <= 1) and 0 <= s < 2**32
    assert args.max_new_tokens >= 1 if command == "generate" else (args.size is None or min(args.size) >= 1)


def _checkpoint_copy(tmp_path_factory, name: str) -> Path:
    """A shipped checkpoint without its checksum record (a mutated manifest would otherwise only ever be refused as
    damaged), so that every mutation reaches the manifest's reader and, when it is accepted, the parameters."""
    copy = tmp_path_factory.mktemp("manifest") / name
    shutil.copytree(ROOT / "checkpoints" / name, copy)
    (copy / "checksums.json").unlink()
    return copy


@pytest.fixture(scope="module")
def manifest_copies(tmp_path_factory) -> dict[str, Path]:
    return {name: _checkpoint_copy(tmp_path_factory, name) for name in ("stdlib-llama", "digits-emu3")}


def _nested(base: dict):
    """`base` with values replaced (or deleted) at the top level, inside `config` / `emu3`, or one level below."""
    paths = [(k,) for k in base] + [(k, sub) for k in ("config", "emu3") if k in base for sub in base[k]]
    paths += [("emu3", part, sub) for part in ("vq_config", "vocab") if part in base.get("emu3", {})
              for sub in base["emu3"][part]]
    return st.dictionaries(st.sampled_from(paths), st.one_of(json_values, st.just(KeyError)), min_size=1,
                           max_size=3).map(lambda changes: _apply_nested(base, changes))


def _apply_nested(base: dict, changes: dict) -> dict:
    out = json.loads(json.dumps(base))
    for path, value in changes.items():
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if value is KeyError:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return out


@settings(BOUNDED, max_examples=25)
@given(st.sampled_from(["stdlib-llama", "digits-emu3"]).flatmap(lambda name: st.tuples(
    st.just(name), st.one_of(
        _nested(json.loads((ROOT / "checkpoints" / name / "zipjax.json").read_text())).map(json.dumps),
        st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=8)).map(
            lambda cut: _flip((ROOT / "checkpoints" / name / "zipjax.json").read_bytes(), *cut).decode("latin-1")),
        st.integers(0, 2000).map(lambda n: (ROOT / "checkpoints" / name / "zipjax.json").read_text()[:n])))))
def test_checkpoint_manifests_load_or_are_refused(manifest_copies, name_and_text):
    """Whole zipjax.json files, mutated at any level (format, version, config, the Emu3 record), truncated or with
    bytes overwritten: `load` returns a model or raises ZipjaxError, never another exception."""
    name, text = name_and_text
    folder = manifest_copies[name]
    (folder / "zipjax.json").write_text(text, encoding="latin-1")
    model = _accepted_or_refused(zipjax.load, folder)
    assert model is None or isinstance(model, zipjax.Model)
