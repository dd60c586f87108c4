"""Emu3 against transformers on a tiny random model: language-model logits, VQ-VAE decode and encode, the
text-to-image pipeline (greedy with CFG, token for token against `generate` with Emu3's documented prefix
constraint and transformers' CFG processor), the image-understanding prompt, PNG output and the `zipjax image` CLI."""

import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from random_hf import save_random_emu3
from transformers import Emu3ForConditionalGeneration
from zipjax.convert import convert

import zipjax
from zipjax.cli import main as cli_main
from zipjax.emu3.png import encode_png, read_image, write_png
from zipjax.emu3.understand import fit_size, image_prompt_ids, question_prompt
from zipjax.image import format_prompt, generate_image


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu3")
    hf_dir = save_random_emu3(root / "hf")
    convert(hf_dir, root / "zj", progress=False)
    hf = Emu3ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return zipjax.load(root / "zj"), hf, root


def test_loads_as_emu3(emu3):
    model, hf, _ = emu3
    assert isinstance(model, zipjax.Emu3Model) and model.config.architecture == "emu3"
    vocab, hf_vocab = model.vocab, hf.config.vocabulary_map
    assert vocab.eol == hf_vocab["<|extra_200|>"] and vocab.boi == hf_vocab["<|image start|>"]
    assert vocab.visual_offset == hf_vocab["<|visual token 000000|>"]
    assert model.vq_config.spatial_factor == 2 and model.vq_config.image_mean == (0.5, 0.5, 0.5)


def test_language_model_logits_match_transformers(emu3):
    model, hf, _ = emu3
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 48))
    ours = np.asarray(model.logits(ids))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    err = np.abs(ours - ref).max()
    print(f"Emu3 LM logits max abs error {err:.2e}")
    assert err <= 1e-4


def test_vq_decode_matches_transformers(emu3):
    model, hf, _ = emu3
    codes = np.random.default_rng(1).integers(0, model.vq_config.codebook_size, (2, 6, 5))
    ours = np.asarray(model.decode_codes(codes))
    with torch.no_grad():
        ref = hf.model.vqmodel.decode(torch.tensor(codes)).numpy().transpose(0, 2, 3, 1)
    err = np.abs(ours - ref).max()
    print(f"VQ-VAE decode max abs error {err:.2e} (pixels up to {np.abs(ref).max():.2f})")
    assert ours.shape == (2, 12, 10, 3) and err <= 1e-4


def test_vq_encode_codes_identical(emu3):
    model, hf, _ = emu3
    pixels = np.random.default_rng(2).uniform(-1, 1, (3, 16, 12, 3)).astype(np.float32)
    ours = np.asarray(model.encode_pixels(pixels))
    with torch.no_grad():
        out = hf.model.vqmodel.encode(torch.tensor(pixels.transpose(0, 3, 1, 2)), torch.tensor([[16, 12]] * 3))
    ref = np.stack([t.numpy() for t in out.image_tokens])
    assert ours.shape == (3, 8, 6)
    np.testing.assert_array_equal(ours, ref)


def _constraint(vocab, rows: int, cols: int):
    """Emu3's documented `prefix_allowed_tokens_fn` for transformers' generate."""
    visual = list(vocab.visual_ids)

    def allowed(batch_id, input_ids):
        start = torch.nonzero(input_ids == vocab.image_wrapper, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - start
        end = (cols + 1) * rows
        if offset % (cols + 1) == 0:
            return [vocab.eol]
        return {end + 1: [vocab.eof], end + 2: [vocab.eoi], end + 3: [vocab.eos]}.get(
            int(offset), [vocab.pad] if offset > end + 3 else visual)

    return allowed


@pytest.mark.parametrize("size,cfg_scale", [((8, 12), 3.0), ((10, 6), 1.0)])
def test_greedy_image_tokens_match_transformers_generate(emu3, size, cfg_scale):
    model, hf, _ = emu3
    negative = "blurry, low quality"
    result = generate_image(model, "a photo of a cat", size=size, cfg_scale=cfg_scale, negative_prompt=negative,
                            temperature=0.0)
    rows, cols = size[0] // 2, size[1] // 2
    cond = torch.tensor([result.prompt_ids[0]])
    guidance = {}
    if cfg_scale != 1.0:
        guidance = dict(guidance_scale=cfg_scale,
                        negative_prompt_ids=torch.tensor([format_prompt(model, negative, rows, cols)]))
    out = hf.generate(input_ids=cond, max_new_tokens=rows * (cols + 1) + 3, do_sample=False,
                      prefix_allowed_tokens_fn=_constraint(model.vocab, rows, cols), **guidance)
    np.testing.assert_array_equal(result.tokens[0], out[0, cond.shape[1]:].numpy())
    with torch.no_grad():
        pixels = hf.model.decode_image_tokens(out[:, cond.shape[1]:], height=rows, width=cols)
    assert np.abs(model.decode_codes(result.codes) - pixels.numpy().transpose(0, 2, 3, 1)).max() <= 1e-4


def test_image_layout_and_pass_count(emu3):
    model, _, _ = emu3
    result = generate_image(model, ["a red sofa", "mountains at sunset"], size=(8, 10), top_k=8, temperature=1.0,
                            seed=3)
    vocab, rows, cols = model.vocab, 4, 5
    body = result.tokens[:, : rows * (cols + 1)].reshape(2, rows, cols + 1)
    assert np.all(body[..., -1] == vocab.eol)
    visual = body[..., :-1]
    assert np.all((visual >= vocab.visual_offset) & (visual < vocab.visual_offset + vocab.codebook_size))
    np.testing.assert_array_equal(result.tokens[:, -3:], [[vocab.eof, vocab.eoi, vocab.eos]] * 2)
    assert result.num_forward_passes == rows * (cols + 1)
    assert result.images.shape == (2, 8, 10, 3) and result.images.dtype == np.uint8
    again = generate_image(model, ["a red sofa", "mountains at sunset"], size=(8, 10), top_k=8, seed=3)
    np.testing.assert_array_equal(result.tokens, again.tokens)
    assert not np.array_equal(result.tokens, generate_image(model, ["a red sofa", "mountains at sunset"],
                                                            size=(8, 10), top_k=8, seed=4).tokens)


def test_image_token_prompt_and_bad_requests(emu3):
    model, _, _ = emu3
    ids = format_prompt(model, "a cat", 4, 4)
    assert ids[0] == model.vocab.bos and ids[-1] == model.vocab.image_wrapper
    by_text = generate_image(model, "a cat", size=(8, 8), temperature=0)
    by_ids = generate_image(model, ids, size=(8, 8), temperature=0)
    np.testing.assert_array_equal(by_text.tokens, by_ids.tokens)
    with pytest.raises(zipjax.ZipjaxError, match="multiple of the VQ-VAE's factor 2"):
        generate_image(model, "a cat", size=(7, 8))
    with pytest.raises(zipjax.ZipjaxError, match="ending with the image token"):
        generate_image(model, ids[:-1], size=(8, 8))
    with pytest.raises(zipjax.ZipjaxError, match="positions"):
        generate_image(model, "a cat", size=(64, 64))
    with pytest.raises(zipjax.ZipjaxError, match="codes must lie"):
        model.decode_codes(np.full((1, 2, 2), model.vq_config.codebook_size))


def test_understanding_prompt_matches_transformers(emu3):
    """Our image prompt (VQ codes as visual tokens + EOL per row) gives the logits transformers computes from
    pixel values and `<image>` placeholders."""
    model, hf, _ = emu3
    image = np.random.default_rng(4).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    pixels = model.normalize(image)
    codes = np.asarray(model.encode_pixels(pixels))[0]
    ours = question_prompt(model, codes, "What is in the picture?")
    placeholder = hf.config.vocabulary_map["<image>"]
    image_ids = image_prompt_ids(model, codes)
    start = ours.index(model.vocab.image_wrapper) + 1
    body = len(image_ids) - image_ids.index(model.vocab.image_wrapper) - 3
    theirs = ours[:start] + [placeholder] * body + ours[start + body:]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([theirs]), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                 image_sizes=torch.tensor([[16, 12]])).logits.numpy()
    err = np.abs(np.asarray(model.logits([ours])) - ref).max()
    print(f"image-understanding logits max abs error {err:.2e}")
    assert err <= 1e-4


def test_fit_size_rule():
    assert fit_size(720, 720, 8, 512 * 512, 1024 * 1024) == (720, 720)
    assert fit_size(100, 50, 8, 512 * 512, 1024 * 1024) == (728, 368)  # scaled up to the minimum area
    h, w = fit_size(4000, 3000, 8, 512 * 512, 1024 * 1024)
    assert h * w <= 1024 * 1024 and h % 8 == w % 8 == 0 and abs(h / w - 4 / 3) < 0.02


def test_png_round_trip(tmp_path):
    image = np.random.default_rng(5).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = write_png(tmp_path / "x.png", image)
    np.testing.assert_array_equal(read_image(path), image)
    assert encode_png(image)[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(zipjax.ZipjaxError, match="uint8"):
        encode_png(image.astype(np.float32))


def test_cli_image_and_ask(emu3, tmp_path, capsys):
    _, _, root = emu3
    out = tmp_path / "cat.png"
    assert cli_main(["image", "--checkpoint", str(root / "zj"), "a cat", "--size", "8x12", "--out", str(out),
                     "--seed", "1"]) == 0
    assert read_image(out).shape == (8, 12, 3)
    assert "(8x12 pixels, HxW as --size; 28 forward passes" in capsys.readouterr().err
    assert cli_main(["image", "--checkpoint", str(root / "zj"), "a cat", "--size", "8x12", "--out", str(out),
                     "--zipar-window", "2"]) == 0
    assert "(8x12 pixels, HxW as --size; 12 forward passes" in capsys.readouterr().err
    assert cli_main(["image", "--checkpoint", str(root / "zj"), "a cat", "--size", "8x12", "--out", str(out),
                     "--zipar-window", "adaptive", "--zipar-min-window", "6"]) == 0
    assert "(8x12 pixels, HxW as --size; 24 forward passes" in capsys.readouterr().err
    # a minimum window wider than the image (6 codes) decodes row after row; it used to hang after row 1
    assert cli_main(["image", "--checkpoint", str(root / "zj"), "a cat", "--size", "8x12", "--out", str(out),
                     "--zipar-window", "adaptive", "--zipar-min-window", "50"]) == 0
    assert "(8x12 pixels, HxW as --size; 24 forward passes" in capsys.readouterr().err
    for flags, message in ((["--zipar-window", "2", "--sjd-window", "4"], "two decoders; give one"),
                           (["--sjd-window", "1"], "SJD jacobi_window must be >= 2")):
        assert cli_main(["image", "--checkpoint", str(root / "zj"), "a cat", "--out", str(tmp_path / "no.png"),
                         *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert cli_main(["ask", str(out), "What is this?", "--checkpoint", str(root / "zj"),
                     "--max-new-tokens", "4"]) == 0
    assert cli_main(["image", "--checkpoint", str(root / "zj"), "a cat", "--size", "9x12",
                     "--out", str(tmp_path / "bad.png")]) == 2
    assert "multiple of the VQ-VAE's factor" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_image_refuses_a_text_model(tiny_models, tmp_path, capsys):
    path = Path(tiny_models["llama_gqa"].zj_dir)
    assert cli_main(["image", "--checkpoint", str(path), "a cat", "--out", str(tmp_path / "x.png")]) == 2
    assert "needs an Emu3 checkpoint" in capsys.readouterr().err


def test_eval_shape_over_the_real_emu3_gen_config():
    """The published Emu3-Gen sizes (transformers' Emu3Config defaults): parameter counts equal transformers' own
    model (built on the meta device), and the 720x720 pipeline traces to the right shapes at zero cost."""
    import jax
    from transformers import Emu3Config

    from zipjax.config import ModelConfig, RopeConfig
    from zipjax.emu3 import Emu3Vocab, VQConfig
    from zipjax.emu3.decoding import ImageDecodeSetup, ImageInputs, ImageKnobs, ImageLayout, prefill
    from zipjax.emu3.sequential import SequentialState, _decode_until
    from zipjax.emu3.vqvae import VQVAE, abstract_vq_params
    from zipjax.sampling import SamplingMode
    from zipjax.transformer import abstract_params, param_count

    with torch.device("meta"):
        hf = Emu3ForConditionalGeneration(Emu3Config(vocabulary_map={}))
    hf_lm = sum(p.numel() for n, p in hf.named_parameters() if "vqmodel" not in n)
    hf_vq = sum(p.numel() for n, p in hf.named_parameters() if "vqmodel" in n)
    hf_vq += sum(b.numel() for n, b in hf.named_buffers() if "running_" in n)  # BatchNorm statistics

    config = ModelConfig(architecture="emu3", vocab_size=184622, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=9216,
                         rope=RopeConfig(theta=1e6), bos_token_id=151849, eos_token_ids=(151850,),
                         pad_token_id=151643, dtype="bfloat16")
    vq = VQConfig()
    assert param_count(abstract_params(config)) == hf_lm == 8_492_011_520
    assert param_count(abstract_vq_params(vq)) == hf_vq
    print(f"Emu3-Gen: language model {hf_lm:,} parameters, VQ-VAE {hf_vq:,}")

    abstract_vq = abstract_vq_params(vq)
    pixels = jax.eval_shape(lambda p, c: VQVAE(vq).apply({"params": p}, c, method=VQVAE.decode), abstract_vq,
                            jax.ShapeDtypeStruct((1, 90, 90), jnp.int32))
    assert pixels.shape == (1, 720, 720, 3)

    vocab = Emu3Vocab(bos=151849, eos=151850, pad=151643, image_wrapper=151851, boi=151852, eoi=151853, eol=151846,
                      eof=151847, visual_offset=151854, codebook_size=32768)
    assert vocab.visual_offset + vocab.codebook_size == config.vocab_size
    layout = ImageLayout(90, 90, vocab.eol, vocab.visual_offset, vocab.codebook_size)
    setup = ImageDecodeSetup(config, layout, batch=1, guided=True, mode=SamplingMode(greedy=False, top_k=True),
                             bucket=64)
    knobs = ImageKnobs(cfg_scale=jnp.float32(3), temperature=jnp.float32(1), top_k=jnp.int32(2048),
                       top_p=jnp.float32(1))
    cache = jax.eval_shape(lambda: zipjax.KVCache.init(config, 2, 8320, jnp.zeros((2,), jnp.int32)))
    params = abstract_params(config)
    inputs = ImageInputs(prompt=jax.ShapeDtypeStruct((2, 64), jnp.int32), starts=jax.ShapeDtypeStruct((2,), jnp.int32),
                         key=jax.random.key(0), knobs=knobs)
    code, cache = jax.eval_shape(functools.partial(prefill, setup=setup), params, inputs, cache)
    state = SequentialState(step=jnp.ones((), jnp.int32), tokens=jax.ShapeDtypeStruct((1, 8190), jnp.int32),
                            last_token=code, positions=jax.ShapeDtypeStruct((2,), jnp.int32), cache=cache)
    state = jax.eval_shape(functools.partial(_decode_until, setup=setup), params, state, jnp.int32(8190),
                           inputs.key, knobs)
    assert state.tokens.shape == (1, 8190) and state.cache.k[0].shape == (2, 8, 8320, 128)
    assert layout.num_tokens == 8190
