"""data/prepare.py and train.py end to end, on the CPU, with tiny models and everything in a temp dir."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.prepare import is_val, prepare_file, prepare_stdlib
from tidar import GPT, GPTConfig, get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--seq_len=32", "--block_len=4", "--batch_size=8",
        "--eval_iters=4", "--warmup_iters=5", "--lr=3e-3", "--log_interval=10"]


def run(*args, env=None):
    # One thread: tiny models run fastest that way, and a shared machine's busy cores do not stall them.
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def train(*args, **kw):
    return run(os.path.join(ROOT, "train.py"), *args, **kw)


def evals(stdout):
    """[(iter, val loss, ar, diff)] from the eval lines."""
    pattern = r"eval (\d+): val loss ([\d.]+) \(ar ([\d.]+).*; diff ([\d.]+)\)"
    return [(int(i), *map(float, rest)) for i, *rest in re.findall(pattern, stdout)]


def read_docs(path, eot):
    ids = np.fromfile(path, dtype=np.uint16).tolist()
    docs, start = [], 0
    for n, t in enumerate(ids):
        if t == eot:
            docs.append(ids[start:n])
            start = n + 1
    assert start == len(ids), "every document ends with <|endoftext|>"
    return docs


# --- data/prepare.py


def make_stdlib(root, names):
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"# {name}\nprint('<|endoftext|> is text here', 'é')\n")
    return {name: open(os.path.join(root, name), encoding="utf-8").read() for name in names}


def test_prepare_stdlib_split_meta_and_round_trip(tmp_path):
    names = [f"mod{i}.py" for i in range(40)] + ["pkg/sub.py"]
    texts = make_stdlib(tmp_path / "lib", names)
    make_stdlib(tmp_path / "lib", ["site-packages/numpy.py", "__pycache__/x.py", "pkg/README.txt"])
    (tmp_path / "lib" / "latin1.py").write_bytes(b"# caf\xe9\n")  # not UTF-8: skipped
    meta = prepare_stdlib(tmp_path / "out", root=tmp_path / "lib")

    assert {k: meta[k] for k in ("tokenizer", "vocab_size", "mask_id", "eot_id", "n_files")} == \
        dict(tokenizer="byte", vocab_size=257, mask_id=257, eot_id=256, n_files=len(names))
    assert meta["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert re.fullmatch("[0-9a-f]{64}", meta["corpus_sha256"])
    enc = get_tokenizer("byte")
    split = {s: [enc.decode(d) for d in read_docs(tmp_path / "out" / f"{s}.bin", 256)] for s in ("train", "val")}
    assert sorted(split["train"] + split["val"]) == sorted(texts.values())  # lossless, nothing else got in
    assert split["val"] == [texts["mod15.py"]] and not is_val("pkg/sub.py")  # pinned: a hash of the path
    assert meta["val_tokens"] == len(texts["mod15.py"].encode()) + 1

    # the split does not move when files come and go, and the corpus hash does
    texts2 = make_stdlib(tmp_path / "lib2", names[10:] + [f"new{i}.py" for i in range(40)])
    meta2 = prepare_stdlib(tmp_path / "out2", root=tmp_path / "lib2")
    val2 = [enc.decode(d) for d in read_docs(tmp_path / "out2" / "val.bin", 256)]
    assert texts["mod15.py"] in val2 and len(val2) == 3  # and two of the new files
    assert all(is_val(n) == (t in val2) for n, t in texts2.items())
    assert meta2["corpus_sha256"] != meta["corpus_sha256"]
    assert 0.03 < np.mean([is_val(f"pkg{i}/m{j}.py") for i in range(50) for j in range(40)]) < 0.07


def test_prepare_cli_own_text(tmp_path):
    text = "def f(x):\n    return x + 1\n" * 50 + "ünïcode ✓\n"
    (tmp_path / "mine.txt").write_text(text)
    r = run("data/prepare.py", "--input", str(tmp_path / "mine.txt"), "--name", str(tmp_path / "mine"))
    assert r.returncode == 0, r.stderr
    assert "--data_dir=" in r.stdout
    enc = get_tokenizer("byte")
    train_docs, val_docs = (read_docs(tmp_path / "mine" / f"{s}.bin", 256) for s in ("train", "val"))
    assert len(train_docs) == len(val_docs) == 1 and len(val_docs[0]) > 0
    assert enc.decode(train_docs[0] + val_docs[0]) == text  # split by position, val is the tail
    meta = prepare_file(tmp_path / "mine.txt", tmp_path / "again")
    assert meta["n_files"] == 1 and meta["train_tokens"] + meta["val_tokens"] == len(text.encode()) + 2


def test_prepare_gpt2_without_vocabulary_says_what_to_do(tmp_path):
    (tmp_path / "mine.txt").write_text("hello")
    # an empty tiktoken cache and a proxy that refuses: no download possible, whatever the machine
    (tmp_path / "cache").mkdir()
    refuse = "http://127.0.0.1:9"  # the discard port: nothing listens there
    env = dict(TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"), HTTPS_PROXY=refuse, HTTP_PROXY=refuse, NO_PROXY="")
    r = run("data/prepare.py", "--input", str(tmp_path / "mine.txt"), "--name", str(tmp_path / "out"),
            "--tokenizer=gpt2", env=env)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "TIKTOKEN_CACHE_DIR" in r.stderr and "--tokenizer=byte" in r.stderr
    assert not (tmp_path / "out").exists()


# --- train.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny TiDAR run of 40 steps on tidar.py's own source: (data_dir, out_dir, stdout)."""
    tmp = tmp_path_factory.mktemp("trained")
    prepare_file(os.path.join(ROOT, "tidar.py"), tmp / "data")
    r = train(f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'out'}", "--max_iters=40", "--eval_interval=20", *TINY)
    assert r.returncode == 0, r.stderr
    return tmp / "data", tmp / "out", r.stdout


def test_sample_reads_what_train_wrote(trained):
    _, out_dir, _ = trained
    r = run("sample.py", f"--out_dir={out_dir}", "--prompt=def ", "--max_new_tokens=16", "--compare", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert "--- TiDAR: 16 new tokens" in r.stdout and "outputs identical: True" in r.stdout


def test_train_writes_a_checkpoint_and_the_loss_goes_down(trained):
    data_dir, out_dir, stdout = trained
    ev = evals(stdout)
    assert [e[0] for e in ev] == [0, 20, 40]
    assert ev[-1][1] < ev[0][1] - 1.0 and ev[-1][2] < ev[0][2] - 1.0 and ev[-1][3] < ev[0][3] - 1.0
    assert re.search(r"iter 10: loss [\d.]+ \(ar [\d.]+, diff [\d.]+\), lr .* ms/iter, .* tok/s", stdout)
    assert re.search(r"draft acc % by offset 0\.\.3: \d+ \d+ \d+ \d+\n", stdout)

    assert os.listdir(out_dir) == ["ckpt.pt"]  # no temporary file left behind
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 40 and ckpt["tokenizer"] == "byte"
    assert ckpt["best_val_loss"] == pytest.approx(min(e[1] for e in ev[1:]), abs=1e-4)
    assert ckpt["train_config"]["objective"] == "tidar" and ckpt["train_config"]["n_embd"] == 32
    GPT(GPTConfig(**ckpt["model_config"])).load_state_dict(ckpt["model"])  # plain keys: no _orig_mod., module.


def test_resume_continues_the_iteration_count(trained, tmp_path):
    data_dir, out_dir, stdout = trained
    shutil.copytree(out_dir, tmp_path / "out")
    r = train(f"--out_dir={tmp_path / 'out'}", "--init_from=resume", "--max_iters=60")  # the rest from the checkpoint
    assert r.returncode == 0, r.stderr
    assert "from iter 40" in r.stdout and "iter 10:" not in r.stdout and "iter 50:" in r.stdout
    assert evals(r.stdout)[0][:2] == evals(stdout)[-1][:2]  # the weights it stopped with
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 60 and ckpt["train_config"]["max_iters"] == 60
    assert ckpt["optimizer"]["state"][0]["step"] == 60  # AdamW's bias correction continues too


def test_ar_baseline_trains_on_the_same_data(trained, tmp_path):
    data_dir, _, _ = trained
    r = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--objective=ar", "--max_iters=20",
              "--eval_interval=20", *TINY)
    assert r.returncode == 0, r.stderr
    ev = evals(r.stdout)
    assert ev[-1][2] < ev[0][2] - 1.0  # AR loss down; the untrained diffusion mode stays near chance
    assert re.search(r"iter 10: loss ([\d.]+) \(ar \1\), lr", r.stdout)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["train_config"]["objective"] == "ar"


def test_torchrun_two_processes_with_gloo(trained, tmp_path):
    data_dir, _, _ = trained
    r = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", f"--data_dir={data_dir}",
            f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=4", "--grad_accum=2", *TINY, "--log_interval=2")
    assert r.returncode == 0, r.stderr
    assert "on 2 x cpu" in r.stdout and "iter 4:" in r.stdout
    assert r.stdout.count("eval 4:") == 1  # rank 0 alone reports
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 4


def test_missing_default_dataset_is_prepared(tmp_path):
    r = train(f"--data_dir={tmp_path / 'pystdlib'}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1",
              "--eval_iters=1", *TINY)
    assert r.returncode == 0, r.stderr
    assert "preparing the default dataset" in r.stdout
    meta = (tmp_path / "pystdlib" / "meta.json").read_text()
    assert '"source": "python stdlib"' in meta and '"n_files": ' in meta


@pytest.mark.parametrize("case,args,message,code", [
    ("unknown setting", ["--n_layers=2"], "unknown setting '--n_layers=2' (did you mean --n_layer?)", 2),
    ("wrong type", ["--batch_size=2.5"], "--batch_size=2.5: expected int", 2),
    ("wrong choice", ["--objective=diffusion"], "expected one of 'tidar', 'ar'", 2),
    ("missing dataset", ["--data_dir={tmp}/nowhere"], "no dataset in", 1),
    ("unreadable checkpoint", ["--init_from=resume"], "cannot read checkpoint", 1),
    ("incompatible checkpoint", ["--init_from=resume", "--n_layer=2"], "n_layer=1 in the checkpoint but 2 now", 1),
    ("foreign checkpoint", ["--init_from=resume"], "is incompatible: it lacks", 1),
    ("nan loss", ["--init_from=resume", "--lr=1e30", "--max_iters=60", "--log_interval=1"], "training diverged", 1),
])
def test_bad_input_one_line_and_the_checkpoint_is_intact(trained, tmp_path, case, args, message, code):
    data_dir, out_dir, _ = trained
    shutil.copytree(out_dir, tmp_path / "out")
    ckpt = tmp_path / "out" / "ckpt.pt"
    if case == "unreadable checkpoint":
        ckpt.write_bytes(b"not a checkpoint")
    if case == "foreign checkpoint":
        torch.save({"state_dict": {}}, ckpt)
    before = ckpt.read_bytes()
    r = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", *TINY, *(a.format(tmp=tmp_path) for a in args))
    assert r.returncode == code
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("train.py: error: ") and message in r.stderr
    assert ckpt.read_bytes() == before and os.listdir(tmp_path / "out") == ["ckpt.pt"]
