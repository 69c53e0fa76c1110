"""Running a script of benchmarks/ from a test: one thread, this repository on the path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.paths import REPO


def run_benchmark(script: str, out: Path, *args: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` with ``args`` and ``--write out``; its JSON report."""
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args, "--write", str(out)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        check=True,
        timeout=timeout,
        capture_output=True,
    )
    return json.loads(out.read_text())
