"""`zipjax generate` as people use it: standard input, a JSONL batch in and out, status lines that say what the
run did (compile / prefill / decode, KV bytes, the expert the router chose), chat messages checked by shape."""

import io
import json
from pathlib import Path

import pytest

import zipjax
from zipjax.cli import main
from zipjax.tokenizer import chat_messages

ROOT = Path(__file__).resolve().parents[1]
STDLIB = ROOT / "checkpoints" / "stdlib-llama"
BANK = ROOT / "checkpoints" / "stdlib-experts" / "bank"


def _run(args, capsys, monkeypatch, stdin: str | None = None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_prompt_from_standard_input_equals_the_same_prompt_as_an_argument(capsys, monkeypatch):
    code, from_arg, err = _run(["generate", "def parse(text):", "--max-new-tokens", "12"], capsys, monkeypatch)
    assert code == 0
    code, from_stdin, _ = _run(["generate", "-", "--max-new-tokens", "12"], capsys, monkeypatch,
                               stdin="def parse(text):")
    assert code == 0 and from_stdin == from_arg
    status = err.strip().splitlines()
    assert len(status) == 1 and "compile" in status[0] and "prefill" in status[0] and "tok/s" in status[0]


def test_a_jsonl_batch_round_trips_in_order_and_equals_single_generation(capsys, monkeypatch, tmp_path):
    prompts = ["def read(path):", "import os", "class Point:"]
    lines = [json.dumps({"id": f"q{i}", "prompt": p}) for i, p in enumerate(prompts)] + ["", "for x in range(3):"]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = _run(["generate", "--prompts", str(tmp_path / "in.jsonl"), "--max-new-tokens", "10",
                           "--batch-size", "2"], capsys, monkeypatch)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r.get("id") for r in rows] == ["q0", "q1", "q2", None]
    model = zipjax.load(STDLIB)
    for row, prompt in zip(rows, [*prompts, "for x in range(3):"], strict=True):
        ids = model.tokenizer.encode(prompt)
        alone = zipjax.generate(model, [ids], 10)[0, len(ids):].tolist()
        stop = next((i for i, t in enumerate(alone) if t in model.config.eos_token_ids), None)
        assert row["text"] == model.tokenizer.decode(alone[:stop])
        assert row["prompt_tokens"] == len(ids)
        assert row["finish_reason"] == ("length" if stop is None else "stop")
        assert row["completion_tokens"] == (10 if stop is None else stop)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": 3}', "must be text"), ('{"prompt": "a", "messages": []}', "exactly one"),
    ("{nope", "not valid JSON"), ('{"messages": [{"role": "user", "content": "hi"}]}', "need --chat"),
    ("", "holds no prompts")])
def test_bad_batch_files_are_one_line_errors(capsys, monkeypatch, tmp_path, content, message):
    (tmp_path / "in.jsonl").write_text(content)
    code, out, err = _run(["generate", "--prompts", str(tmp_path / "in.jsonl")], capsys, monkeypatch)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_the_status_says_the_kv_bytes_and_the_routed_expert(capsys, monkeypatch):
    code, _, err = _run(["generate", "def f(x):", "--max-new-tokens", "4", "--kv", "kivi"], capsys, monkeypatch)
    assert code == 0
    kv_line = [line for line in err.splitlines() if line.startswith("[KV cache kivi:")]
    held, ratio = kv_line[0].split(": ")[1].split(" MiB held, ")
    assert float(held) > 0 and float(ratio.split("x")[0]) > 0
    code, _, err = _run(["generate", "#include <Python.h>\nstatic PyObject *", "--max-new-tokens", "3",
                         "--experts", str(BANK), "--expert", "auto"], capsys, monkeypatch)
    assert code == 0
    assert "[expert: c, chosen by the router]" in err


def test_chat_messages_are_checked_by_shape():
    conversation = chat_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                  {"role": "user", "content": "how?"}], system="be brief")
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "user"]
    assert chat_messages("hi") == [{"role": "user", "content": "hi"}]
    for bad in ([], [{"role": "user"}], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}],
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], b"x"):
        with pytest.raises(zipjax.ZipjaxError):
            chat_messages(bad)


def test_a_router_trained_from_the_cli_routes_auto(capsys, monkeypatch, tmp_path):
    """`zipjax experts router` trains the router of a bank from a text per expert; `--router` points --expert auto
    at it. Texts of three clearly different kinds stand in for the experts' domains."""
    import pydoc_data.topics

    prose = " ".join(pydoc_data.topics.topics.values())[:60_000]
    code = "\n".join(p.read_text() for p in sorted((ROOT / "zipjax").rglob("*.py")))[:60_000]
    c_like = "\n".join(f"static PyObject *\nfunc_{i}(PyObject *self, PyObject *args)\n{{\n    Py_RETURN_NONE;\n}}"
                       for i in range(600))
    for name, text in (("prose", prose), ("tests", code), ("c", c_like)):
        (tmp_path / f"{name}.txt").write_text(text)
    args = ["experts", "router", str(STDLIB), str(BANK), "--out", str(tmp_path / "router"), "--text",
            *(f"{name}={tmp_path / f'{name}.txt'}" for name in ("prose", "c", "tests"))]
    code_, out, err = _run(args, capsys, monkeypatch)
    assert code_ == 0, err
    assert "wrote a router for" in out
    assert _run(args, capsys, monkeypatch)[0] == 2  # a router is there: --overwrite replaces it
    code_, _, err = _run(["generate", "static PyObject *\nfunc(PyObject *self", "--max-new-tokens", "3",
                          "--experts", str(BANK), "--expert", "auto", "--router", str(tmp_path / "router")],
                         capsys, monkeypatch)
    assert code_ == 0 and "[expert: c, chosen by the router]" in err, err
    bad = ["experts", "router", str(STDLIB), str(BANK), "--out", str(tmp_path / "r2"), "--text", "prose=x"]
    assert _run(bad, capsys, monkeypatch)[0] == 2
