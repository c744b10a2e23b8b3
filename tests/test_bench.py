"""bench.py runs end to end on the CPU with a tiny model; its figures are printed, not asserted."""
import subprocess
import sys

import numpy as np

from conftest import ROOT, write_checkpoint


def test_bench_runs_on_cpu(tmp_path):
    write_checkpoint(tmp_path)
    np.random.default_rng(0).integers(0, 256, 500).astype(np.uint16).tofile(tmp_path / "val.bin")
    args = ["--out_dir", str(tmp_path), "--data_dir", str(tmp_path), "--device", "cpu", "--draft_lens", "2,4", "--num_prompts", "2",
            "--prompt_len", "8", "--max_new_tokens", "16", "--cache_len", "16", "--max_queries", "128", "--train_batch", "2", "--repeats", "1"]
    run = subprocess.run([sys.executable, "bench.py"] + args, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "TiDAR k=2" in out and "TiDAR k=4" in out
    assert out.count("True") == 2  # greedy TiDAR == greedy AR on every prompt, for each k
    assert "<- k + k*k for k = 4" in out and "beyond the model's context" in out
    assert "ms/iter" in out
    print(out)
