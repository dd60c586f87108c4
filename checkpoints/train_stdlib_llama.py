"""Re-create checkpoints/stdlib-llama: a small LLaMA-architecture model trained on the Python standard library.

This is zipjax's shipped default model (`zipjax generate` uses it when no --checkpoint is given). It is trained from
scratch, offline, on the `.py` sources of the interpreter running this script, so a fresh machine can rebuild it:

    python checkpoints/train_stdlib_llama.py            # about 1 hour on 2 CPU cores

1. Files are split by a hash of their path: about 2% are held out for evaluation, never trained on.
2. A byte-level BPE tokenizer (4096 tokens) is trained on the training files with the `tokenizers` library.
3. The model (zipjax.transformer.Transformer, GQA, tied embeddings) is trained with optax AdamW on random
   512-token windows of the concatenated files, each file framed by BOS/EOS.
4. Held-out perplexity is measured on the held-out files, then the checkpoint (float32, about 13 MB) is written
   with zipjax.checkpoint.save, with the tokenizer and a README holding the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from zipjax import checkpoint
from zipjax.config import ModelConfig
from zipjax.transformer import Transformer, init_params, param_count

VOCAB = 4096
PAD, BOS, EOS = 0, 1, 2
SPECIAL = ["<pad>", "<s>", "</s>"]

CONFIG = ModelConfig(
    architecture="llama", vocab_size=VOCAB, hidden_size=192, intermediate_size=512, num_layers=6, num_heads=6,
    num_kv_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=BOS, eos_token_ids=(EOS,), pad_token_id=PAD, dtype="float32",
)


def stdlib_files() -> tuple[list[Path], list[Path], Path]:
    """(train, held-out) .py files of this interpreter's standard library, split by a hash of the relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = path.relative_to(root).as_posix()
        (heldout if int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 50 == 0 else train).append(path)
    return train, heldout, root


def train_tokenizer(files: list[Path]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((p.read_text(encoding="utf-8") for p in files), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return tok


def save_tokenizer(tok: Tokenizer, folder: Path) -> list[Path]:
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "model_max_length": CONFIG.max_position_embeddings,
              "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [folder / "tokenizer.json", folder / "tokenizer_config.json"]


def encode_files(tok: Tokenizer, files: list[Path]) -> np.ndarray:
    """One stream: <s> file </s> <s> file </s> ... (the post-processor adds <s>)."""
    encodings = tok.encode_batch([p.read_text(encoding="utf-8") for p in files])
    return np.concatenate([np.array([*e.ids, EOS], np.int32) for e in encodings])


def loss_fn(params, windows: jax.Array) -> jax.Array:
    """Mean next-token cross entropy over windows [batch, seq + 1]."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    logits, _ = Transformer(CONFIG).apply({"params": params}, inputs, positions)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def heldout_nll(params, stream: np.ndarray, seq: int, config: ModelConfig) -> tuple[float, int]:
    """Summed NLL (nats) and token count over non-overlapping windows of the held-out stream."""
    @jax.jit
    def window_nll(p, w):
        inputs, targets = w[:, :-1], w[:, 1:]
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
        logits, _ = Transformer(config).apply({"params": p}, inputs, positions)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()

    n = (len(stream) - 1) // seq
    windows = np.stack([stream[i * seq: i * seq + seq + 1] for i in range(n)])
    total = 0.0
    for i in range(0, n, 8):
        total += float(window_nll(params, jnp.asarray(windows[i:i + 8])))
    return total, n * seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "stdlib-llama")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    t_start = time.time()

    train_files, heldout_files, root = stdlib_files()
    print(f"stdlib {root}: {len(train_files)} training files, {len(heldout_files)} held out", flush=True)
    tok = train_tokenizer(train_files)
    train = encode_files(tok, train_files)
    heldout = encode_files(tok, heldout_files)
    heldout_bytes = sum(len(p.read_text(encoding="utf-8").encode()) for p in heldout_files)
    print(f"tokens: {len(train):,} train, {len(heldout):,} held out ({time.time() - t_start:.0f}s)", flush=True)

    params = init_params(CONFIG, jax.random.key(args.seed))
    print(f"model: {param_count(params):,} parameters", flush=True)
    warmup = min(100, args.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, end_value=args.lr * 0.1)
    decay_mask = jax.tree.map(lambda x: x.ndim > 1, params)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, windows):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    t_train, losses = time.time(), []
    for step in range(1, args.steps + 1):
        offsets = rng.integers(0, len(train) - args.seq - 1, args.batch)
        windows = np.stack([train[o: o + args.seq + 1] for o in offsets])
        params, opt_state, loss = train_step(params, opt_state, jnp.asarray(windows))
        losses.append(float(loss))
        if step % 25 == 0 or step == args.steps:
            elapsed = time.time() - t_train
            eta = elapsed / step * (args.steps - step)
            print(f"step {step}/{args.steps}  loss {np.mean(losses[-25:]):.3f}  lr {float(schedule(step)):.2e}  "
                  f"{step * args.batch * args.seq / elapsed:,.0f} tok/s  eta {eta / 60:.0f} min", flush=True)

    nll, count = heldout_nll(params, heldout, args.seq, CONFIG)
    ppl, bpb = math.exp(nll / count), nll / math.log(2) / (count * heldout_bytes / len(heldout))
    print(f"held-out perplexity {ppl:.3f} per token, {bpb:.3f} bits per byte", flush=True)

    metrics = {
        "heldout_perplexity": round(ppl, 4), "heldout_bits_per_byte": round(bpb, 4), "heldout_tokens": count,
        "heldout_files": len(heldout_files), "train_files": len(train_files), "train_tokens": len(train),
        "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed,
        "final_train_loss": round(float(np.mean(losses[-50:])), 4), "parameters": param_count(params),
        "python": platform.python_version(), "jax": jax.__version__,
        "train_minutes": round((time.time() - t_start) / 60, 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        files = save_tokenizer(tok, Path(tmp))
        readme = Path(tmp) / "README.md"
        readme.write_text(model_card(metrics))
        checkpoint.save(args.out, CONFIG, params, files=[*files, readme],
                        metadata={"source": {"kind": "trained", "script": "checkpoints/train_stdlib_llama.py",
                                             "metrics": metrics}},
                        overwrite=args.overwrite)
    print(f"wrote {args.out} ({time.time() - t_start:.0f}s in all)", flush=True)


def model_card(m: dict) -> str:
    return f"""# stdlib-llama

zipjax's shipped default checkpoint: a {m['parameters'] / 1e6:.1f}M-parameter LLaMA-architecture model (6 layers,
hidden 192, 6 query / 2 KV heads, tied embeddings, 4096-token byte-level BPE, context 512) trained from scratch on
the Python {m['python']} standard library sources. It writes plausible Python; it is a demo and a test fixture, not
a useful code model.

Re-create it with `python checkpoints/train_stdlib_llama.py` (about {m['train_minutes']:.0f} minutes on 2 CPU cores).

| held-out metric ({m['heldout_files']} files never trained on, {m['heldout_tokens']:,} tokens) | value |
|---|---|
| perplexity per token | {m['heldout_perplexity']:.2f} |
| bits per byte | {m['heldout_bits_per_byte']:.3f} |

Training: {m['steps']} AdamW steps of {m['batch']} x {m['seq']} tokens (peak lr {m['lr']}, cosine decay), seed
{m['seed']}, on {m['train_files']} files ({m['train_tokens']:,} tokens); final training loss {m['final_train_loss']}.
Weights are stored in float32, exactly as evaluated.
"""


if __name__ == "__main__":
    sys.exit(main())
