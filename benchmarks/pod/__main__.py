"""`python -m benchmarks.pod` (from the repository root) or `python benchmarks/pod`: the pod benchmark's command
line (see the package docstring)."""

import sys
from pathlib import Path

if not __package__:  # run as a folder (python benchmarks/pod): the repository root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.pod.cli import main

main()
