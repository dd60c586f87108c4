"""benchmarks/report.py, the helper every benchmark writes its results through: Markdown and fixed-width tables,
JSON of typed records, earlier results read back (from --out, else the tracked file), and the rule that keeps casual
runs off the tracked results: every benchmark that writes a file takes `--out`, whose default is the git-ignored
benchmarks/results/local/."""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import report

ROOT = report.ROOT


def test_markdown_and_fixed_width_tables():
    lines = report.format_table(("a", "bb"), [(1, "x"), ("22", "yy")], title="## t")
    assert lines == ["## t", "| a | bb |", "|---|---|", "| 1 | x |", "| 22 | yy |"]
    fixed = report.format_table(("name", "n"), [("ab", "3"), ("c", "too wide to pad: a note")], specs=("<4", ">3"))
    assert fixed == ["name   n", "ab     3", "c    too wide to pad: a note"]
    assert report.format_table(("name", "n", "m"), [("x", "a note")], specs=("<4", ">3", ">3"))[1] == "x    a note"


@dataclasses.dataclass(frozen=True)
class _Inner:
    value: float

    def to_json(self):
        return {"v": self.value}


@dataclasses.dataclass(frozen=True)
class _Outer:
    name: str
    inner: _Inner
    count: np.int64


def test_json_of_records_and_numpy(tmp_path):
    path = report.write_json(tmp_path / "deep" / "r.json", {"rows": [_Outer("x", _Inner(0.5), np.int64(3))],
                                                          "array": np.arange(3), "scalar": np.float32(1.5)})
    assert json.loads(path.read_text()) == {"rows": [{"name": "x", "inner": {"v": 0.5}, "count": 3}],
                                            "array": [0, 1, 2], "scalar": 1.5}


def test_earlier_results_come_from_out_else_the_tracked_file(tmp_path, monkeypatch):
    tracked, out = tmp_path / "tracked", tmp_path / "out"
    monkeypatch.setattr(report, "RESULTS", tracked)
    assert report.previous_results(out / "x.json") == ({}, out / "x.json")
    report.write_json(tracked / "x.json", {"from": "tracked"})
    assert report.previous_results(out / "x.json") == ({"from": "tracked"}, tracked / "x.json")
    report.write_json(out / "x.json", {"from": "out"})
    assert report.previous_results(out / "x.json") == ({"from": "out"}, out / "x.json")


def test_out_defaults_to_an_ignored_folder_and_every_writing_benchmark_takes_it():
    parser = argparse.ArgumentParser()
    report.add_out_argument(parser)
    assert parser.parse_args([]).out == report.LOCAL == ROOT / "benchmarks" / "results" / "local"
    assert "/benchmarks/results/local/" in (ROOT / ".gitignore").read_text().splitlines()
    scripts = [p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "report.py"]
    scripts.append(ROOT / "benchmarks" / "pod" / "cli.py")
    for script in scripts:
        text = script.read_text()
        if "write_json" in text or "json.dump" in text or "savefig" in text:
            assert "report.add_out_argument(parser)" in text, f"{script.name} writes results without --out"
            assert "json.dump" not in text and "savefig" not in text, f"{script.name} writes around report.py"
