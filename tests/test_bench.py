"""bench.py and ablations.py run end to end on the CPU with tiny models; their figures are printed, not asserted."""
import subprocess
import sys

import numpy as np
import pytest
from dataclasses import replace

from conftest import BYTE_MODEL, ROOT, write_checkpoint

SMALL = ["--device", "cpu", "--draft_lens", "2,4", "--num_prompts", "2", "--batches", "1,3", "--prompt_len", "8",
         "--max_new_tokens", "16", "--cache_len", "16", "--max_queries", "128", "--train_batch", "2", "--repeats", "1"]


def bench(tmp_path, *args):
    run = subprocess.run([sys.executable, "bench.py", "--out_dir", str(tmp_path), "--data_dir", str(tmp_path), *args],
                         cwd=ROOT, capture_output=True, text=True)
    return run


def test_bench_runs_on_cpu(tmp_path):
    write_checkpoint(tmp_path)
    np.random.default_rng(0).integers(0, 256, 500).astype(np.uint16).tofile(tmp_path / "val.bin")
    run = bench(tmp_path, *SMALL)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "TiDAR k=2" in out and "TiDAR k=4" in out
    assert out.count("True") == 2  # greedy TiDAR == greedy AR on every prompt, for each k
    assert "vs AR k=4" in out and out.count("TiDAR k=2: ") == 1  # the batch sweep and where TiDAR stops winning
    assert "<- k + k*k for k = 4" in out and "beyond the model's context" in out
    assert "ms/iter" in out
    print(out)


@pytest.mark.parametrize("case,message", [
    ("no val.bin", "no {tmp}/val.bin to take prompts from"),
    ("short val.bin", "too few for prompts of 8"),
    ("too long", "exceeds the model's context of 96: use --max_new_tokens=80 or less"),
    ("bad dtype", "--dtypes=float33: use torch dtype names"),
])
def test_bench_bad_input(tmp_path, case, message):
    write_checkpoint(tmp_path)
    if case != "no val.bin":
        np.arange(5 if case == "short val.bin" else 500, dtype=np.uint16).tofile(tmp_path / "val.bin")
    extra = {"too long": ["--max_new_tokens", "200"], "bad dtype": ["--dtypes", "float33"]}.get(case, [])
    run = bench(tmp_path, *SMALL, *extra)
    assert run.returncode != 0 and len(run.stderr.splitlines()) == 1
    assert message.format(tmp=tmp_path) in run.stderr


def test_ablations_run_on_cpu(tmp_path):
    for name, config in [("main", BYTE_MODEL), ("b2", replace(BYTE_MODEL, block_len=2)),
                         ("drafter", replace(BYTE_MODEL, n_embd=8, n_head=1))]:
        write_checkpoint(tmp_path / name, config)
    np.random.default_rng(0).integers(0, 256, 500).astype(np.uint16).tofile(tmp_path / "val.bin")
    args = ["--out_dir", str(tmp_path / "main"), "--block_dirs", f"{tmp_path / 'b2'},{tmp_path / 'main'}",
            "--drafter_dir", str(tmp_path / "drafter"), "--data_dir", str(tmp_path), "--device", "cpu",
            "--draft_lens", "2,4", "--speculative_lens", "1,3", "--num_prompts", "1", "--prompt_len", "8",
            "--max_new_tokens", "8"]
    run = subprocess.run([sys.executable, "ablations.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    rule_rows = {tuple(line.split()[:2]): line for line in lines
                 if line.split()[:1] in (["lossless"], ["paper"]) and line.split()[1][0].isdigit()}
    assert len(rule_rows) == 6 and rule_rows["lossless", "1.0"].endswith("True")  # lossless at beta = 1
    assert "0.0%" in rule_rows["lossless", "1.0"]  # every token the AR model's greedy choice
    assert [line.split()[0] for line in lines if line.split()[:1] in (["2"], ["4"])] == ["2", "4"]  # B = 2, 4
    spec = [line for line in lines if line.lstrip().startswith("speculative k=")]
    assert len(spec) == 2 and all(line.endswith("True") for line in spec)
    assert "EAGLE-3" in run.stdout and "3.51" in run.stdout and "7.45" in run.stdout
    print(run.stdout)
