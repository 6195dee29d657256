"""bench/gpu_check.sh is well-formed and asks bench/throughput.py only for options it has.

The full dry run (`bench/gpu_check.sh --device cpu --dry-run`, about 2 minutes here) is documented
in docs/performance.md; this checks what can break it without running it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_script_parses_and_documents_itself() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    shown = subprocess.run(["bash", str(SCRIPT), "--help"], check=True, capture_output=True, text=True).stdout
    assert "--device cpu --dry-run" in shown and "N = 1, 2, 4, 8" in shown


def test_every_bench_option_the_script_passes_exists(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("throughput", None)
    import throughput

    text = SCRIPT.read_text()
    for block in re.findall(r"ARGS=\((.*?)\)", text, flags=re.S):
        argv = [a.replace('"$DEVICE"', "cpu") for a in block.split()]
        args = throughput.parse_args([*argv, "--hot-swap", "--out", "/tmp/unused"])
        assert args.hot_swap and args.processes in ("1,2", "1,2,4,8")
