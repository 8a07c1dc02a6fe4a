"""tools/bench_tp.py's smoke mode: two gloo ranks on the CPU under torchrun, tiny shapes, every
TP size's row printed and its numbers checked against TP=1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a command run (torchrun, two ranks importing torch and kdfuse): 7-10 s
def test_bench_tp_smoke_run_on_two_cpu_ranks(tmp_path):
    out = tmp_path / "tp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += [str(ROOT / "tools" / "bench_tp.py"), "--device", "cpu", "--configs", "fkl_ce"]
    command += ["--warmup", "1", "--repeat", "2", "--rounds", "1", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", KDFUSE_CACHE_DIR=str(tmp_path / "cache"))
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for method, tp in (("kdfuse", 1), ("kdfuse-tp", 2), ("gather", 2)):
        assert re.search(rf"^\| fkl_ce \| {method} \| {tp} \| [0-9.]+ \|", run.stdout, re.M), run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["tp"]) for r in rows] == [("kdfuse", 1), ("kdfuse-tp", 2), ("gather", 2)]
    assert [r["check"] for r in rows] == ["n/a", "ok", "ok"]
    # The vocab-parallel loss all-reduces row statistics and the hidden states' gradient only.
    tp2 = rows[1]
    assert set(tp2["calls"]) <= {"all_reduce_max", "all_reduce_sum", "all_reduce_min"}
    assert tp2["sent_mb"] > 0 and tp2["loss_err"] < 1e-5
