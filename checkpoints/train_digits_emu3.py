"""Re-create checkpoints/digits-emu3: an Emu3-architecture text-to-image model of handwritten digits, plus the digit
classifier that scores its images. This is ZipAR's offline quality harness (benchmarks/zipar.py).

    pip install scikit-learn          # only this script needs it: the 1,797 scanned digits ship inside it
    python checkpoints/train_digits_emu3.py           # about 40 minutes on 2 CPU cores

1. Data: scikit-learn's handwritten digits (8x8, 17 grey levels), upsampled to 16x16 (bilinear) and quantised to 16
   grey levels, so each pixel is one visual token. 20% are held out (stratified, seed 0), never trained on.
2. Vision tokenizer: a 16-colour grey palette (`PaletteConfig`) stands in for the MoVQ VQ-VAE: code k is grey
   level k/15, one pixel per code, through the same encode / decode interface.
3. The model is zipjax's Emu3 language model, trained with optax on exactly what real Emu3 reads:
   BOS + "a handwritten digit seven" + <|image start|> + "16*16" + <|image token|> + 16 rows of (16 visual tokens +
   EOL) + EOF + EOI + EOS. One prompt in ten drops the digit's name ("a handwritten digit"), which is the
   unconditional prompt for classifier-free guidance. The loss covers the image tokens and what follows.
4. Classifier: a 256-128-10 MLP trained on the real training digits; its held-out accuracy is recorded, and the mean
   and covariance of its 128 features on the held-out digits are stored for the Fréchet distance.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zipjax
from zipjax import checkpoint
from zipjax.config import ModelConfig, RopeConfig
from zipjax.emu3.model import Emu3Vision
from zipjax.emu3.understand import question_ids
from zipjax.emu3.vocab import Emu3Vocab
from zipjax.emu3.vq_config import PaletteConfig
from zipjax.harness.digits_quality import (
    NAMES,
    QUESTION,
    DigitClassifier,
    ask_accuracy,
    generation_quality,
    heldout_digits,
)
from zipjax.transformer import Transformer, init_params, param_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the random-model builders
from random_hf import build_tokenizer

SIDE, LEVELS = 16, 16
SEQ_LEN = 344  # the longest row: an understanding prompt of 334 tokens and " seven" + EOS (more are refused)
UNCONDITIONAL = "a handwritten digit"
OUT = Path(__file__).resolve().parent / "digits-emu3"


def prompt_text(label: int | None) -> str:
    return UNCONDITIONAL if label is None else f"{UNCONDITIONAL} {NAMES[label]}"


def load_digits_16() -> tuple[np.ndarray, np.ndarray]:
    """(codes int32 [n, 16, 16] in 0..15, labels [n]) from scikit-learn's scanned digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = jnp.asarray(digits.images / 16.0, jnp.float32)[..., None]  # [n, 8, 8, 1] in [0, 1]
    up = jax.image.resize(images, (len(images), SIDE, SIDE, 1), method="linear")[..., 0]
    codes = np.clip(np.round(np.asarray(up) * (LEVELS - 1)), 0, LEVELS - 1).astype(np.int32)
    return codes, digits.target.astype(np.int32)


def split(labels: np.ndarray, heldout_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = round(len(idx) * heldout_fraction)
        heldout.extend(idx[:cut])
        train.extend(idx[cut:])
    return np.sort(np.array(train)), np.sort(np.array(heldout))


def grey(codes: np.ndarray) -> np.ndarray:
    """Codes -> uint8 grey images, as the palette decodes them."""
    return np.round(np.asarray(codes) * 255.0 / (LEVELS - 1)).astype(np.uint8)


def train_classifier(codes: np.ndarray, labels: np.ndarray, train: np.ndarray, heldout: np.ndarray,
                     steps: int = 3000) -> DigitClassifier:
    x = jnp.asarray(grey(codes).reshape(len(codes), -1) / 255.0, jnp.float32)
    y = jnp.asarray(labels)
    k1, k2 = jax.random.split(jax.random.key(1))
    params = {"w1": jax.random.normal(k1, (SIDE * SIDE, 128)) * 0.05, "b1": jnp.zeros(128),
              "w2": jax.random.normal(k2, (128, 10)) * 0.05, "b2": jnp.zeros(10)}

    def loss(p, xb, yb):
        logits = jax.nn.relu(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    opt = optax.adamw(1e-3, weight_decay=1e-3)
    state = opt.init(params)

    @jax.jit
    def step(p, s, key):
        idx = jax.random.choice(key, jnp.asarray(train), (128,))
        grads = jax.grad(loss)(p, x[idx], y[idx])
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    key = jax.random.key(2)
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, state = step(params, state, sub)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    clf = DigitClassifier(**p, real_mean=np.zeros(128), real_cov=np.eye(128), heldout_accuracy=0.0)
    feats = clf.features(grey(codes[heldout]))
    return DigitClassifier(**p, real_mean=feats.mean(0), real_cov=np.cov(feats, rowvar=False),
                           heldout_accuracy=clf.accuracy(grey(codes[heldout]), labels[heldout]))


def generation_rows(tok, vocab: Emu3Vocab, codes: np.ndarray, labels: np.ndarray, drop: np.ndarray):
    """(prompt, target) token lists of text-to-image: the loss covers every image token and the closing tokens."""
    rows = []
    for c, label, unconditional in zip(codes, labels, drop, strict=True):
        prompt = [vocab.bos, *tok.encode(prompt_text(None if unconditional else int(label)),
                                         add_special_tokens=False),
                  vocab.boi, *tok.encode(f"{SIDE}*{SIDE}", add_special_tokens=False), vocab.image_wrapper]
        body = vocab.codes_to_tokens(c).reshape(-1).tolist()
        rows.append((prompt, [*body, vocab.eof, vocab.eoi, vocab.eos]))
    return rows


def understanding_rows(tok, vocab: Emu3Vocab, codes: np.ndarray, labels: np.ndarray):
    """(prompt, target) token lists of image understanding: the prompt `zipjax.emu3.ask` builds for the digit and
    QUESTION, and the digit's name (" seven") with EOS as the answer, the only tokens the loss covers."""
    return [(question_ids(tok, vocab, c, QUESTION), [*tok.encode(f" {NAMES[int(label)]}", add_special_tokens=False),
                                                     vocab.eos]) for c, label in zip(codes, labels, strict=True)]


def sequences(rows: list[tuple[list[int], list[int]]], pad: int, length: int):
    """Token ids [n, length] (right-padded) and the loss mask over next-token targets (the targets only)."""
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length - 1), np.float32)
    for i, (p, b) in enumerate(rows):
        ids[i, : len(p) + len(b)] = p + b
        mask[i, len(p) - 1: len(p) + len(b) - 1] = 1.0
    return ids, mask


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ask-fraction", type=float, default=0.25,
                        help="share of each batch that is image understanding (the rest is text-to-image)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this checkpoint's parameters and classifier (same tokenizer) instead of "
                             "random ones: how the shipped model learned to answer, from the text-to-image one")
    parser.add_argument("--measure", type=Path, default=None,
                        help="only print the metrics of this checkpoint (before / after a retraining)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args()


def build_vocabulary():
    corpus = [prompt_text(c) for c in range(10)] * 3 + [f"{SIDE}*{SIDE}", "0123456789 *"]
    tokenizer = build_tokenizer(LEVELS, text_vocab=300, corpus=corpus)
    vmap = tokenizer.get_vocab()
    vocab = Emu3Vocab.from_vocab_map(vmap, bos=vmap["<|extra_203|>"], eos=vmap["<|extra_204|>"],
                                     pad=vmap["<|endoftext|>"], codebook_size=LEVELS, where="digits tokenizer")
    config = ModelConfig(architecture="emu3", vocab_size=len(vmap), hidden_size=128, intermediate_size=384,
                         num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=512,
                         rope=RopeConfig(theta=10000.0), bos_token_id=vocab.bos, eos_token_ids=(vocab.eos,),
                         pad_token_id=vocab.pad, dtype="float32")
    return tokenizer, vocab, config


def starting_point(args, config: ModelConfig, vocab: Emu3Vocab, codes, labels, train, heldout):
    """(parameters, classifier): random ones and a new classifier, or the --init checkpoint's."""
    if args.init is None:
        classifier = train_classifier(codes, labels, train, heldout)
        return init_params(config, jax.random.key(0)), classifier
    model = zipjax.load(args.init)
    if model.config != config or model.vocab != vocab:
        raise SystemExit(f"{args.init} is not a digits model of this script's configuration and tokenizer")
    return jax.tree.map(jnp.asarray, model.params), DigitClassifier.load(args.init)


def train(args, config: ModelConfig, params, gen: tuple, ask: tuple):
    """AdamW on batches of (1 - ask_fraction) text-to-image and ask_fraction understanding sequences; the loss is
    the mean of the two tasks' per-token losses (the reported loss too)."""
    n_ask = round(args.batch * args.ask_fraction)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 20), args.steps,
                                                  end_value=args.lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.95,
                                                                        weight_decay=0.05))
    opt_state = optimizer.init(params)
    loss_fn = make_loss(config, args.batch, gen[0].shape[1])

    @jax.jit
    def train_step(p, s, key):
        k1, k2 = jax.random.split(key)
        i = jax.random.randint(k1, (args.batch - n_ask,), 0, gen[0].shape[0])
        j = jax.random.randint(k2, (n_ask,), 0, ask[0].shape[0])
        batch_ids = jnp.concatenate([gen[0][i], ask[0][j]])
        # each task's mean per target token, weighted alike: an answer is 3 tokens against an image's 275
        weights = jnp.concatenate([gen[1][i] / gen[1][i].sum(), ask[1][j] / ask[1][j].sum()])
        loss, grads = jax.value_and_grad(loss_fn)(p, batch_ids, weights)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    key = jax.random.key(1)
    tick = time.time()
    for step in range(1, args.steps + 1):
        key, sub = jax.random.split(key)
        params, opt_state, loss = train_step(params, opt_state, sub)
        if step % 50 == 0 or step in (10, args.steps):
            rate = step / (time.time() - tick)
            print(f"step {step}/{args.steps}  loss {float(loss):.4f}  eta {(args.steps - step) / rate / 60:.1f} min",
                  flush=True)
    return params, float(loss)


def make_loss(config: ModelConfig, batch: int, length: int):
    model = Transformer(config)
    positions = jnp.broadcast_to(jnp.arange(length - 1, dtype=jnp.int32), (batch, length - 1))

    def loss_fn(p, batch_ids, batch_mask):
        logits, _ = model.apply({"params": p}, batch_ids[:, :-1], positions[: len(batch_ids)])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch_ids[:, 1:])
        return (nll * batch_mask).sum() / batch_mask.sum()

    return jax.jit(loss_fn)


def heldout_nll(config: ModelConfig, params, ids: np.ndarray, mask: np.ndarray, batch: int = 32) -> float:
    """Per-token NLL of the held-out digits' image tokens (text-to-image rows), in whole batches as always."""
    loss_fn = make_loss(config, batch, ids.shape[1])
    return float(np.mean([loss_fn(params, jnp.asarray(ids[i:i + batch]), jnp.asarray(mask[i:i + batch]))
                          for i in range(0, len(ids) - batch + 1, batch)]))


def measure(folder: Path, classifier: DigitClassifier) -> dict:
    """Both directions of a saved digits model: held-out ask accuracy, and classifier accuracy / Fréchet distance
    of 500 generated digits (sequential decoding, benchmarks/zipar.py's settings)."""
    model = zipjax.load(folder)
    codes, labels = heldout_digits(folder)
    asked = ask_accuracy(model, codes, labels)
    drawn = generation_quality(model, classifier, 500)
    return {"ask_heldout_accuracy": round(asked["accuracy"], 4),
            "generated_classifier_accuracy": round(drawn["accuracy"], 4),
            "generated_frechet_distance": round(drawn["frechet"], 3), "generated_images": drawn["images"]}


def dropped(n: int) -> np.ndarray:
    """Which digits' prompts drop the name (one in ten, seed 0): the unconditional prompt of guidance."""
    return np.random.default_rng(0).random(n) < 0.1


def measure_only(args, config: ModelConfig, tokenizer, vocab: Emu3Vocab) -> None:
    codes, labels = load_digits_16()
    _, heldout = split(labels)
    model = zipjax.load(args.measure)
    ids, mask = sequences(generation_rows(tokenizer, vocab, codes, labels, dropped(len(codes))), vocab.pad, SEQ_LEN)
    metrics = {"heldout_image_nll_per_token": round(heldout_nll(config, model.params, ids[heldout], mask[heldout]), 4),
               **measure(args.measure, DigitClassifier.load(args.measure))}
    print(json.dumps(metrics, indent=2), flush=True)


def main() -> None:
    args = parse_args()
    start = time.time()
    tokenizer, vocab, config = build_vocabulary()
    if args.measure is not None:
        return measure_only(args, config, tokenizer, vocab)
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists; pass --overwrite to replace it")
    codes, labels = load_digits_16()
    train_idx, heldout = split(labels)
    print(f"{len(codes)} digits: {len(train_idx)} for training, {len(heldout)} held out", flush=True)
    params, classifier = starting_point(args, config, vocab, codes, labels, train_idx, heldout)
    print(f"classifier held-out accuracy {classifier.heldout_accuracy:.4f}", flush=True)
    gen = sequences(generation_rows(tokenizer, vocab, codes, labels, dropped(len(codes))), vocab.pad, SEQ_LEN)
    ask = sequences(understanding_rows(tokenizer, vocab, codes, labels), vocab.pad, SEQ_LEN)
    print(f"model: {param_count(params):,} parameters, sequences of {SEQ_LEN} tokens", flush=True)
    params, loss = train(args, config, params, *[(jnp.asarray(ids[train_idx]), jnp.asarray(mask[train_idx]))
                                                 for ids, mask in (gen, ask)])
    metrics = {"classifier_heldout_accuracy": round(classifier.heldout_accuracy, 4),
               "heldout_image_nll_per_token": round(heldout_nll(config, params, gen[0][heldout], gen[1][heldout]), 4),
               "final_train_loss": round(loss, 4), "parameters": param_count(params), "train_images": len(train_idx),
               "heldout_images": len(heldout), "steps": args.steps, "batch": args.batch,
               "ask_fraction": args.ask_fraction, "lr": args.lr,
               "initialised_from": None if args.init is None else "the text-to-image digits model (--init)"}
    with tempfile.TemporaryDirectory() as tmp:
        save(args, Path(tmp) / "model", config, params, tokenizer, vocab, classifier, codes, labels, heldout, metrics)
        metrics.update(measure(Path(tmp) / "model", classifier))
    metrics.update(seconds=round(time.time() - start), python=platform.python_version(), jax=jax.__version__)
    print(json.dumps(metrics, indent=2), flush=True)
    staging = args.out.with_name(f".{args.out.name}.new")  # the checkpoint holds files zipjax.save does not replace
    shutil.rmtree(staging, ignore_errors=True)
    save(args, staging, config, params, tokenizer, vocab, classifier, codes, labels, heldout, metrics)
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    print(f"wrote {args.out}")


def save(args, out: Path, config, params, tokenizer, vocab, classifier, codes, labels, heldout, metrics) -> None:
    palette = np.repeat((np.arange(LEVELS, dtype=np.float32) / (LEVELS - 1) * 2 - 1)[:, None], 3, axis=1)
    vision = Emu3Vision(PaletteConfig(codebook_size=LEVELS, max_pixels=SIDE * SIDE), vocab, image_area=SIDE * SIDE,
                        negative_prompt="a handwritten digit")  # the unconditional prompt it was trained with
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        np.savez(Path(tmp) / "heldout.npz", codes=codes[heldout], labels=labels[heldout])
        classifier.save(tmp)
        (Path(tmp) / "README.md").write_text(model_card(metrics))
        files = sorted(Path(tmp).iterdir())
        checkpoint.save(out, config, jax.tree.map(np.asarray, params), files=files, overwrite=args.overwrite,
                        vision=(vision, {"codebook": palette}),
                        metadata={"source": {"kind": "trained", "script": "checkpoints/train_digits_emu3.py",
                                             "metrics": metrics}})


def model_card(m: dict) -> str:
    nll_row = (f"| held-out image-token NLL (per token, {m['heldout_images']} digits never trained on) | "
               f"{m['heldout_image_nll_per_token']} |")
    return f"""# digits-emu3

ZipAR's offline quality harness: an Emu3-architecture model ({m['parameters']:,} parameters; 4 layers, hidden 128,
4 query / 2 KV heads) trained from scratch on scikit-learn's scanned handwritten digits, upsampled to 16x16 and
quantised to 16 grey levels (one visual token per pixel; a 16-colour palette is the vision tokenizer). Prompts:
"a handwritten digit seven"; "a handwritten digit" is the unconditional prompt for guidance.

Re-create it with `python checkpoints/train_digits_emu3.py` (needs scikit-learn).

| metric | value |
|---|---|
{nll_row}
| digit classifier (256-128-10 MLP) held-out accuracy | {m['classifier_heldout_accuracy']} |

Training: {m['steps']} AdamW steps of {m['batch']} images on {m['train_images']} digits, final loss
{m['final_train_loss']}. `classifier.npz` holds the classifier and the feature statistics of the held-out digits
(for the Fréchet distance); `heldout.npz` the held-out digits' codes and labels.
"""


if __name__ == "__main__":
    main()
