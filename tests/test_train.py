"""data/prepare.py and train.py end to end, on the CPU, with tiny models and everything in a temp dir."""
import importlib.metadata
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script, start_script

from data.prepare import get_tokenizer, is_val, prepare_file, prepare_pycode
from tidar import GPT, GPTConfig

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--seq_len=32", "--block_len=4", "--batch_size=8",
        "--eval_iters=4", "--warmup_iters=5", "--lr=3e-3", "--log_interval=10", "--ar_iters=0"]


def train(*args, prelude=""):
    """train.py as a user runs it, in a forked child (conftest's run_script), after prelude has patched it."""
    return run_script("train.py", *args, prelude=prelude)


def interpreter(*args, env=None, cwd=ROOT):
    """A fresh Python, for what a forked child cannot show: torchrun's processes, modules of its own."""
    # One thread: tiny models run fastest that way, and a shared machine's busy cores do not stall them.
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def fail_call(name, n, error, half_file=False):
    """
    A prelude: the n-th call of name (like 'torch.optim.AdamW.step') raises error; half_file: it first
    writes half a file where torch.save(obj, path) would have written, as a full disk or a Ctrl-C mid-write
    leaves it.
    """
    owner, attr = name.rsplit(".", 1)
    return f"""
import {name.split(".")[0]}
real, calls = {owner}.{attr}, [0]
def fault(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {n}:
        if {half_file}:
            open(args[1], "wb").write(b"half a checkpoint")
        raise {error}
    return real(*args, **kwargs)
{owner}.{attr} = fault
"""


CTRL_C, DISK_FULL = "KeyboardInterrupt()", "OSError(28, 'No space left on device')"


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


def make_sources(root, names):
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"# {name}\nprint('<|endoftext|> is text here', 'é')\n")
    return {name: open(os.path.join(root, name), encoding="utf-8").read() for name in names}


def test_prepare_stdlib_split_meta_and_round_trip(tmp_path):
    names = [f"mod{i}.py" for i in range(40)] + ["pkg/sub.py"]
    texts = make_sources(tmp_path / "lib", names)
    make_sources(tmp_path / "lib", ["site-packages/numpy.py", "__pycache__/x.py", "pkg/README.txt"])
    (tmp_path / "lib" / "latin1.py").write_bytes(b"# caf\xe9\n")  # not UTF-8: skipped
    meta = prepare_pycode(tmp_path / "out", stdlib=tmp_path / "lib", packages=())

    assert {k: meta[k] for k in ("tokenizer", "vocab_size", "mask_id", "eot_id", "n_files", "files")} == dict(
        tokenizer="code", vocab_size=261, mask_id=261, eot_id=260, n_files=len(names), files={"stdlib": 41})
    assert meta["versions"] == {"python": ".".join(map(str, sys.version_info[:3]))}
    assert re.fullmatch("[0-9a-f]{64}", meta["corpus_sha256"])
    enc = get_tokenizer("code")
    split = {s: [enc.decode(d) for d in read_docs(tmp_path / "out" / f"{s}.bin", 260)]
             for s in ("train", "val")}
    assert sorted(split["train"] + split["val"]) == sorted(texts.values())  # lossless, nothing else got in
    val = [texts[f"mod{i}.py"] for i in (15, 28, 36)]  # pinned: a hash of the name, stdlib/mod15.py ...
    assert split["val"] == val and not is_val("stdlib/pkg/sub.py")
    assert meta["val_tokens"] == sum(len(enc.encode_ordinary(t)) + 1 for t in val)

    # the split does not move when files come and go, and the corpus hash does
    texts2 = make_sources(tmp_path / "lib2", names[10:] + [f"new{i}.py" for i in range(40)])
    meta2 = prepare_pycode(tmp_path / "out2", stdlib=tmp_path / "lib2", packages=())
    val2 = [enc.decode(d) for d in read_docs(tmp_path / "out2" / "val.bin", 260)]
    assert set(val) <= set(val2) and len(val2) == 4  # and one of the new files
    assert all(is_val(f"stdlib/{n}") == (t in val2) for n, t in texts2.items())
    assert meta2["corpus_sha256"] != meta["corpus_sha256"]
    assert 0.03 < np.mean([is_val(f"pkg{i}/m{j}.py") for i in range(50) for j in range(40)]) < 0.07


def test_prepare_adds_the_installed_packages(tmp_path, monkeypatch):
    # a package as pip installs one: its folder, found through sys.path, and its version in a .dist-info
    make_sources(tmp_path / "lib", ["os.py"])
    site = tmp_path / "site"
    fake = make_sources(site / "fakepkg", ["__init__.py", "sub/mod.py"] + [f"m{i}.py" for i in range(40)])
    make_sources(site / "fakepkg", ["__pycache__/m0.py"])  # caches are skipped
    (site / "fakepkg-1.2.3.dist-info").mkdir()
    (site / "fakepkg-1.2.3.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg\n"
                                                               "Version: 1.2.3\n")
    monkeypatch.syspath_prepend(tmp_path / "site")
    meta = prepare_pycode(tmp_path / "out", stdlib=tmp_path / "lib", packages=("fakepkg",))

    assert meta["files"] == {"stdlib": 1, "fakepkg": 42} and meta["n_files"] == 43
    assert meta["versions"]["fakepkg"] == "1.2.3" and "fakepkg" in meta["source"]
    enc = get_tokenizer("code")
    val = [enc.decode(d) for d in read_docs(tmp_path / "out" / "val.bin", 260)]
    assert val == [fake["m0.py"], fake["m12.py"], fake["m28.py"]]  # by the hash of fakepkg/m0.py ...
    texts = list(fake.values()) + [open(tmp_path / "lib" / "os.py").read()]
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(enc.encode_ordinary(t)) + 1 for t in texts)

    with pytest.raises(FileNotFoundError,
                       match="'nosuchpkg' is not installed: pip install -r requirements.txt"):
        prepare_pycode(tmp_path / "out2", stdlib=tmp_path / "lib", packages=("nosuchpkg",))
    assert not (tmp_path / "out2").exists()


def prepare(*args):
    return run_script("data/prepare.py", *map(str, args))


def test_prepare_cli_own_text(tmp_path):
    text = "def f(x):\n    return x + 1\n" * 50 + "ünïcode ✓\n"
    (tmp_path / "mine.txt").write_text(text)
    r = prepare("--input", tmp_path / "mine.txt", "--name", tmp_path / "mine")
    assert r.returncode == 0, r.stderr
    assert "--data_dir=" in r.stdout
    enc = get_tokenizer("code")
    train_docs, val_docs = (read_docs(tmp_path / "mine" / f"{s}.bin", 260) for s in ("train", "val"))
    assert len(train_docs) == len(val_docs) == 1 and len(val_docs[0]) > 0
    assert enc.decode(train_docs[0] + val_docs[0]) == text  # split by position, val is the tail
    assert len(train_docs[0]) + len(val_docs[0]) < len(text.encode())  # the indentation became single tokens
    meta = prepare_file(tmp_path / "mine.txt", tmp_path / "again", tokenizer="byte")
    assert meta["n_files"] == 1 and meta["train_tokens"] + meta["val_tokens"] == len(text.encode()) + 2
    before = files(tmp_path / "mine")  # a second run into the same folder refuses, and changes nothing there
    r = prepare("--input", tmp_path / "mine.txt", "--name", tmp_path / "mine", "--tokenizer=byte")
    assert r.returncode == 1 and r.stderr == (f"prepare.py: error: {tmp_path / 'mine'} already holds a "
                                              "dataset: pick another --name, or replace it with "
                                              "--overwrite\n")
    assert files(tmp_path / "mine") == before
    r = prepare("--input", tmp_path / "mine.txt", "--name", tmp_path / "mine", "--tokenizer=byte",
                "--overwrite")
    assert r.returncode == 0
    assert json.loads((tmp_path / "mine" / "meta.json").read_text())["tokenizer"] == "byte"


def test_prepare_cli_hint_pastes_and_empty_input_refused(tmp_path):
    (tmp_path / "my notes.txt").write_text("def f(x):\n    return x\n" * 20)
    r = prepare("--input", tmp_path / "my notes.txt", "--name", tmp_path / "my notes")
    assert r.returncode == 0, r.stderr
    hint = r.stdout.splitlines()[-1].removeprefix("train on it with: ")
    # one argument
    assert shlex.split(hint)[2] == f"--data_dir={os.path.relpath(tmp_path / 'my notes', ROOT)}"
    (tmp_path / "empty.txt").write_text("")
    r = prepare("--input", tmp_path / "empty.txt", "--name", tmp_path / "empty")
    assert r.returncode == 1 and r.stderr == (f"prepare.py: error: {tmp_path / 'empty.txt'} is empty: give a "
                                              "file with the text to train on\n")
    assert not (tmp_path / "empty").exists()


def test_tokenizers_round_trip_and_merge_runs_of_spaces():
    code, byte = get_tokenizer("code"), get_tokenizer("byte")
    assert (code.n_vocab, code.eot_token, byte.n_vocab, byte.eot_token) == (261, 260, 257, 256)
    text = "def f(x):\n" + " " * 13 + "return  x  # ünïcode\t \n<|endoftext|>"
    for enc in (code, byte):
        assert enc.decode(enc.encode(text, allowed_special="all")) == text
    assert byte.encode_ordinary(text) == list(text.encode())  # one byte, one token
    ids = code.encode_ordinary(" " * 13 + "x")
    assert [code.decode([t]) for t in ids] == [" " * 8, " " * 4, " ", "x"]  # runs merge as BPE merges pairs
    assert code.encode_ordinary("a b") == byte.encode_ordinary("a b")  # single spaces stay bytes


def test_prepare_gpt2_without_vocabulary_says_what_to_do(tmp_path):
    (tmp_path / "mine.txt").write_text("hello")
    # an empty tiktoken cache and a proxy that refuses: no download possible, whatever the machine
    (tmp_path / "cache").mkdir()
    refuse = "http://127.0.0.1:9"  # the discard port: nothing listens there
    env = dict(TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"), HTTPS_PROXY=refuse, HTTP_PROXY=refuse, NO_PROXY="")
    # a fresh interpreter: this process's tiktoken may hold the GPT-2 vocabulary, where it could load it
    r = interpreter("data/prepare.py", "--input", str(tmp_path / "mine.txt"), "--name", str(tmp_path / "out"),
                    "--tokenizer=gpt2", env=env)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "TIKTOKEN_CACHE_DIR" in r.stderr and "--tokenizer=code or byte" in r.stderr
    assert not (tmp_path / "out").exists()


def test_prepare_cli_ctrl_c_leaves_nothing(tmp_path):
    (tmp_path / "mine.txt").write_text("hello\n" * 100)
    r = run_script("data/prepare.py", "--input", str(tmp_path / "mine.txt"), "--name", str(tmp_path / "mine"),
                   prelude=fail_call("tiktoken.Encoding.encode_ordinary_batch", 1, CTRL_C))
    assert r.returncode == 130
    assert r.stderr == f"prepare.py: interrupted; nothing was left in {tmp_path / 'mine'}\n"
    assert not (tmp_path / "mine").exists()  # not even the folder it made


# --- train.py


def python_like_text(n=700):
    """A fixed text the tests own, Python of a simple kind (a file of the project would move every loss with
    each edit of a comment)."""
    rng = random.Random(0)
    names, ops = ["x", "y", "total", "count", "value", "item", "name", "size", "step"], "+-*"
    defs = []
    for i in range(n):
        a, b = rng.sample(names, 2)
        defs.append(f"def {a}_{i % 41}({a}, {b}):\n    return {a} {rng.choice(ops)} {b}\n\n")
    return "".join(defs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny TiDAR run of 40 steps on python_like_text(): (data_dir, out_dir, stdout)."""
    tmp = tmp_path_factory.mktemp("trained")
    (tmp / "text.py").write_text(python_like_text())
    prepare_file(tmp / "text.py", tmp / "data")
    r = train(f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'out'}", "--max_iters=40",
              "--eval_interval=20", *TINY)
    assert r.returncode == 0, r.stderr
    return tmp / "data", tmp / "out", r.stdout


def test_sample_reads_what_train_wrote(trained):
    _, out_dir, _ = trained
    r = run_script("sample.py", f"--out_dir={out_dir}", "--prompt=def ", "--max_new_tokens=16", "--compare",
                   "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert "--- TiDAR: 16 new tokens" in r.stdout and "outputs identical: True" in r.stdout


def test_train_writes_a_checkpoint_and_the_loss_goes_down(trained):
    data_dir, out_dir, stdout = trained
    ev = evals(stdout)
    assert [e[0] for e in ev] == [0, 20, 40]
    assert ev[-1][1] < ev[0][1] - 1.0 and ev[-1][2] < ev[0][2] - 1.0 and ev[-1][3] < ev[0][3] - 1.0
    assert re.search(r"iter 10: loss [\d.]+ \(ar [\d.]+, diff [\d.]+\), lr .* ms/iter, .* tok/s", stdout)
    assert re.search(rf"done: iters 0..40 in \dm\d\ds; the last checkpoint is {out_dir}/ckpt.pt \(iter 40\)",
                     stdout)
    assert re.search(r"draft acc % by offset 0\.\.3: \d+ \d+ \d+ \d+\n", stdout)

    assert os.listdir(out_dir) == ["ckpt.pt"]  # no temporary file left behind
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 40 and ckpt["tokenizer"] == "code"
    assert ckpt["best_val_loss"] == pytest.approx(min(e[1] for e in ev[1:]), abs=1e-4)
    assert ckpt["train_config"]["objective"] == "tidar" and ckpt["train_config"]["n_embd"] == 32
    # plain keys: no _orig_mod., module.
    GPT(GPTConfig(**ckpt["model_config"])).load_state_dict(ckpt["model"])


def test_resume_continues_the_iteration_count(trained, tmp_path):
    data_dir, out_dir, stdout = trained
    shutil.copytree(out_dir, tmp_path / "out")
    # the rest from the checkpoint
    r = train(f"--out_dir={tmp_path / 'out'}", "--init_from=resume", "--max_iters=60")
    assert r.returncode == 0, r.stderr
    assert "from iter 40" in r.stdout and "iter 10:" not in r.stdout and "iter 50:" in r.stdout
    assert evals(r.stdout)[0][:2] == evals(stdout)[-1][:2]  # the weights it stopped with
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 60 and ckpt["train_config"]["max_iters"] == 60
    assert ckpt["optimizer"]["state"][0]["step"] == 60  # AdamW's bias correction continues too


def test_rollouts_py_is_train_py_with_the_masks_toward_greedy_rollouts(trained, tmp_path):
    """experiments/rollouts.py (beyond the paper) resumes train.py's run: --rollout=0 is train.py bit for
    bit; --rollout=1 changes the diffusion term from the first step and not the AR term; the checkpoint
    keeps the setting. A value out of [0, 1] is one line, before anything starts."""
    _, out_dir, _ = trained
    runs = {}
    rollouts = "experiments/rollouts.py"
    for name, script, args in [("train.py", "train.py", []), ("0", rollouts, ["--rollout=0"]),
                               ("1", rollouts, ["--rollout=1"])]:
        shutil.copytree(out_dir, tmp_path / name)
        runs[name] = start_script(script, f"--out_dir={tmp_path / name}", "--init_from=resume",
                                  "--max_iters=50", "--log_interval=1", *args)
    logs = {name: r.wait() for name, r in runs.items()}
    assert all(r.returncode == 0 for r in logs.values()), logs["1"].stderr
    first = {name: re.search(r"iter 41: loss [\d.]+ \(ar ([\d.]+), diff ([\d.]+)\)", r.stdout).groups()
             for name, r in logs.items()}
    assert first["0"] == first["train.py"] and evals(logs["0"].stdout) == evals(logs["train.py"].stdout)
    assert first["1"][0] == first["0"][0] and first["1"][1] != first["0"][1]
    assert torch.load(tmp_path / "1" / "ckpt.pt", weights_only=True)["train_config"]["rollout"] == 1.0
    # resumed without the flag, the run goes on with its own --rollout=1, as if it were given again
    shutil.copytree(tmp_path / "1", tmp_path / "1 again")
    kept = start_script(rollouts, f"--out_dir={tmp_path / '1'}", "--init_from=resume", "--max_iters=55")
    given = run_script(rollouts, f"--out_dir={tmp_path / '1 again'}", "--init_from=resume", "--max_iters=55",
                       "--rollout=1")
    kept = kept.wait()
    assert kept.returncode == 0 and given.returncode == 0, kept.stderr + given.stderr
    assert evals(kept.stdout) == evals(given.stdout) and len(evals(kept.stdout)) == 1  # at iter 55
    bad = run_script(rollouts, f"--out_dir={tmp_path / 'new'}", "--rollout=2")
    assert bad.returncode == 2 and bad.stderr == "rollouts.py: error: --rollout=2.0: must be in [0, 1]\n"
    assert not os.path.exists(tmp_path / "new")


def test_ar_baseline_trains_on_the_same_data(trained, tmp_path):
    data_dir, _, _ = trained
    r = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--objective=ar", "--max_iters=20",
              "--eval_interval=20", *TINY)
    assert r.returncode == 0, r.stderr
    ev = evals(r.stdout)
    assert ev[-1][2] < ev[0][2] - 1.0  # the AR loss goes down
    assert re.search(r"iter 10: loss ([\d.]+) \(ar \1\), lr", r.stdout)  # and the loss is the AR term alone
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["train_config"]["objective"] == "ar"


def test_torchrun_two_processes_with_gloo(trained, tmp_path):
    data_dir, _, _ = trained
    r = interpreter("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                    f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=4",
                    "--grad_accum=2", *TINY, "--log_interval=2")
    assert r.returncode == 0, r.stderr
    assert "on 2 x cpu" in r.stdout and "iter 4:" in r.stdout
    assert r.stdout.count("eval 4:") == 1  # rank 0 alone reports
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 4


def python_files(folder, names):
    """For shutil.copytree: the project's code alone (not a virtual environment, results or datasets)."""
    return [n for n in names if not n.endswith(".py") and not (folder == ROOT and n == "data")]


def test_missing_default_dataset_is_prepared_beside_train_py(tmp_path):
    # The real default, this machine's Python sources (about 6 s): what `python train.py` does the first
    # time, here from another folder. The dataset goes beside train.py (a copy of the project), not where it
    # started. A fresh interpreter: the copy's own modules, found as Python finds them from there.
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(ROOT, project, ignore=python_files)
    elsewhere.mkdir()
    r = interpreter(str(project / "train.py"), *TINY, "--max_iters=1", "--eval_iters=1", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert "preparing the default dataset" in r.stdout
    # the checkpoint where it was started, the dataset beside train.py
    assert os.listdir(elsewhere) == ["out"]
    meta = json.loads((project / "data" / "pycode" / "meta.json").read_text())
    # as pip names the versions: 2.14.1, where torch.__version__ is 2.14.1+cu130
    pip = {name: importlib.metadata.version(name) for name in ("torch", "numpy", "tiktoken")}
    assert meta["versions"] == pip | dict(python=platform.python_version())
    assert meta["files"]["stdlib"] > 500 and meta["files"]["torch"] > 500 and meta["files"]["numpy"] > 100
    assert meta["n_files"] == sum(meta["files"].values())
    size = os.path.getsize(project / "data" / "pycode" / "train.bin")
    assert size == 2 * meta["train_tokens"] > 10 * meta["val_tokens"]


def test_cpu_preset_instead_of_the_gpu_defaults(trained, tmp_path):
    data_dir, _, _ = trained
    r = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--device=cpu", "--max_iters=1",
              "--ar_iters=0", "--eval_iters=1", "--batch_size=1")
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[0]
    assert line.startswith("no GPU: training the CPU preset instead of the GPU defaults (")
    assert "the log shows the time left" in line
    config = torch.load(tmp_path / "ckpt.pt", weights_only=True)["train_config"]
    said = dict(re.findall(r"(\w+)=([^\s)]+)", line))  # the values it trains with, listed in that line
    assert said and all(str(config[k]) == v for k, v in said.items())
    assert config["n_layer"] != 8 and config["seq_len"] != 1024  # not the GPU defaults (--help lists those)
    assert said["max_iters"] == said["batch_size"] == "1"  # the command line wins over the preset
    # the README's sample command works on the preset's model as written (new tokens: what the context leaves)
    r = run_script("sample.py", f"--out_dir={tmp_path}", "--prompt", "def fibonacci(n):", "--compare",
                   "--device=cpu")
    assert r.returncode == 0, r.stderr
    # (it may stop early at <|endoftext|>)
    assert "--- TiDAR: " in r.stdout and "outputs identical: True" in r.stdout


def test_cpu_preset_names_its_two_stages_and_promises_no_time(trained, tmp_path):
    """Machines of the same name differ by 3x or more: the first line points at the log's time left, never
    at a number of minutes. It names the AR stage and the TiDAR steps after it only where there are two."""
    data_dir, _, _ = trained
    stop = fail_call("tidar.GPT.__init__", 1, "SystemExit(0)")  # stop when the model is built: the line's out

    def first_line(*args):
        r = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'new'}", "--device=cpu", *args,
                  prelude=stop)
        return r.stdout.splitlines()[0]

    line = first_line()  # the preset as it is: the paper's recipe, in one run
    assert "; 3800 AR steps, then 1400 TiDAR steps from them; the log shows the time left; " in line
    assert "minute" not in line
    line = first_line("--objective=ar")
    assert "; the log shows the time left; " in line and "TiDAR steps" not in line and "minute" not in line
    # a run that stops before its first checkpoint leaves no folder behind
    assert not (tmp_path / "new").exists()


def test_ctrl_c_while_starting_is_one_line(trained, tmp_path):
    data_dir, _, _ = trained
    r = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'new'}", *TINY,
              prelude=fail_call("tidar.GPT.__init__", 1, CTRL_C))
    assert r.stderr == "train.py: interrupted before training started; nothing was written\n"
    assert r.returncode == -signal.SIGINT  # as any program stopped by Ctrl-C (a shell shows 130)
    assert not (tmp_path / "new").exists()


def test_help_lists_the_settings_and_the_gpu_defaults():
    for flag in ("--help", "-h"):
        r = train(flag)
        assert r.returncode == 0 and r.stderr == ""
        assert re.search(r"--block_len=16 +# B >= 1, the mask block length", r.stdout)
        assert all(f"--{kv} " in r.stdout for kv in ("n_layer=8", "n_embd=512", "seq_len=1024",
                                                     "batch_size=32", "max_iters=6000", "ar_iters=4000",
                                                     "overwrite=False", "data_dir=data/pycode"))
        assert "with no GPU, a fresh run takes instead" in r.stdout


def test_help_and_a_mistyped_setting_answer_before_torch_is_imported():
    # a fresh interpreter, which lists the modules it imports: torch (a second or more) is not among them
    for args in (["--help"], ["--n_layers=2"]):
        r = interpreter("-X", "importtime", "train.py", *args)
        imported = re.findall(r"^import time: .*\| +(\S+)$", r.stderr, re.M)
        assert "configurator" in imported and "guards" in imported
        assert not {m.split(".")[0] for m in imported} & {"torch", "numpy", "tidar"}


@pytest.fixture(scope="module")
def ar_run(trained, tmp_path_factory):
    """The AR baseline on the same data, 40 steps: its out_dir and stdout."""
    data_dir, _, _ = trained
    out_dir = tmp_path_factory.mktemp("ar") / "out"
    r = train(f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--objective=ar", "--max_iters=40",
              "--eval_interval=20", *TINY)
    assert r.returncode == 0, r.stderr
    return out_dir, r.stdout


def test_continual_pretraining_starts_from_the_ar_weights(trained, ar_run, tmp_path):
    """The paper's recipe: TiDAR from an AR model's weights. Its first evaluation is the AR run's last one
    (the same weights, the same val batches); then the diffusion loss falls, from a fresh optimizer and
    schedule."""
    (data_dir, _, _), (ar_dir, ar_stdout) = trained, ar_run
    r = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path}", f"--init_from={ar_dir}", "--max_iters=40",
              "--eval_interval=20", *TINY)
    assert r.returncode == 0, r.stderr
    assert f"starting from the weights of {ar_dir / 'ckpt.pt'} (an AR run at iter 40), with a fresh " \
           "optimizer and schedule; an AR model never trained its [MASK] embedding" in r.stdout
    assert "tidar model:" in r.stdout and "from iter 0" in r.stdout
    ev, ar_ev = evals(r.stdout), evals(ar_stdout)
    assert ev[0][0] == 0 and ev[0][2:] == ar_ev[-1][2:]  # the AR run's weights exactly, [MASK] row included
    assert ev[-1][3] < ev[0][3] - 1.0  # the diffusion loss falls
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["started_from"] == dict(checkpoint=str(ar_dir / "ckpt.pt"), objective="ar", iter_num=40)
    assert ckpt["train_config"]["init_from"] == str(ar_dir) and ckpt["optimizer"]["state"][0]["step"] == 40


def test_ar_iters_trains_the_ar_stage_first_in_one_run(trained, ar_run, tmp_path):
    """--ar_iters=20: the same recipe in one run. Its first 20 steps are exactly the AR run's (the same model
    at step 20, by its evaluation), then the TiDAR objective takes over and the diffusion loss falls."""
    (data_dir, _, _), (_, ar_stdout) = trained, ar_run
    r = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=40", "--eval_interval=20",
              *TINY, "--ar_iters=20")
    assert r.returncode == 0, r.stderr
    ev = evals(r.stdout)
    assert ev[1][0] == 20 and ev[1][2:] == evals(ar_stdout)[1][2:]
    assert re.search(r"iter 20: loss ([\d.]+) \(ar \1\), lr", r.stdout)  # the AR term alone
    assert re.search(r"iter 30: loss [\d.]+ \(ar [\d.]+, diff [\d.]+\), lr", r.stdout)
    assert ev[2][3] < ev[1][3] - 0.5
    # the time left: in the AR stage that stage's (a TiDAR step has not run yet), then the run's
    assert re.search(r"iter 10: .* tok/s, \d+m\d\ds left of the AR stage, then 20 TiDAR steps\n", r.stdout)
    assert re.search(r"iter 30: .* tok/s, \d+m\d\ds left\n", r.stdout)


@pytest.mark.parametrize("start", ["scratch", "from AR"])
def test_resume_is_exact(trained, ar_run, tmp_path, start):
    """Interrupted after its checkpoint at iter 8 and resumed, a run ends bit for bit where it would have
    ended, whether it started from scratch or from an AR model's weights."""
    data_dir, _, _ = trained
    args = [f"--data_dir={data_dir}", *TINY, "--max_iters=12", "--eval_interval=4", "--grad_accum=2"]
    args += [f"--init_from={ar_run[0]}"] if start == "from AR" else []
    whole = start_script("train.py", *args, f"--out_dir={tmp_path / 'whole'}")  # the two at once
    cut = start_script("train.py", *args, f"--out_dir={tmp_path / 'cut'}",
                       prelude=fail_call("torch.optim.AdamW.step", 10, CTRL_C))
    whole, cut = whole.wait(), cut.wait()
    assert whole.returncode == 0, whole.stderr
    assert cut.returncode == 130 and cut.stderr == \
        f"train.py: interrupted at iter 9; the last checkpoint is {tmp_path / 'cut' / 'ckpt.pt'} (iter 8)\n"
    assert os.listdir(tmp_path / "cut") == ["ckpt.pt"]
    resumed = train(f"--out_dir={tmp_path / 'cut'}", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr

    def eval_lines(stdout):
        return [line for line in stdout.splitlines() if line.startswith(("eval 8:", "eval 12:"))]

    assert len(eval_lines(whole.stdout)) == 2 and eval_lines(resumed.stdout) == eval_lines(whole.stdout)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("whole", "cut"))
    assert a["iter_num"] == b["iter_num"] == 12
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    from_ar = dict(checkpoint=str(ar_run[0] / "ckpt.pt"), objective="ar", iter_num=40)
    assert a["started_from"] == b["started_from"] == (None if start == "scratch" else from_ar)


def test_one_writer_per_out_dir(trained, tmp_path):
    """
    A second train.py into a folder that is being trained refuses with one line, and the first one ends well.
    A run killed outright (no exit handler runs) leaves its lock file behind but no lock: the next run goes
    ahead.
    """
    data_dir, _, _ = trained
    args = [f"--data_dir={data_dir}", *TINY, "--max_iters=4", "--eval_interval=4"]
    started, go = tmp_path / "started", tmp_path / "go"
    hold = f"""
import os, time, torch
real, calls = torch.optim.AdamW.step, [0]
def step(*args, **kwargs):  # the second step waits until the test says go
    calls[0] += 1
    if calls[0] == 2:
        open({str(started)!r}, "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
    return real(*args, **kwargs)
torch.optim.AdamW.step = step
"""
    first = start_script("train.py", *args, f"--out_dir={tmp_path / 'out'}", prelude=hold)
    try:
        for _ in range(1200):
            if started.exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert started.exists(), first.wait().stderr
        for again in ([], ["--overwrite=True"]):  # (no checkpoint yet: a fresh run gets as far as the lock)
            second = train(*args, f"--out_dir={tmp_path / 'out'}", *again)
            assert second.returncode == 1 and second.stderr == (
                f"train.py: error: another train.py (pid {first.pid}) is training into "
                f"--out_dir={tmp_path / 'out'}: wait for it to end, or pick another --out_dir\n")
    finally:
        go.touch()
        ended = first.wait()
    assert ended.returncode == 0, ended.stderr
    assert os.listdir(tmp_path / "out") == ["ckpt.pt"]  # the lock file went with the run

    kill = ("import os, signal, torch\n"
            "torch.optim.AdamW.step = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)")
    killed = train(*args, f"--out_dir={tmp_path / 'killed'}", prelude=kill)
    assert killed.returncode == -signal.SIGKILL and os.listdir(tmp_path / "killed") == ["train.lock"]
    after_kill = train(*args, f"--out_dir={tmp_path / 'killed'}")
    assert after_kill.returncode == 0, after_kill.stderr
    assert os.listdir(tmp_path / "killed") == ["ckpt.pt"]


def test_help_into_a_closed_pipe_is_quiet():
    r = subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} train.py --help | true"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.stderr == ""  # no BrokenPipeError traceback


def test_overwrite_true_replaces_the_checkpoint(trained, tmp_path):
    data_dir, out_dir, _ = trained
    shutil.copytree(out_dir, tmp_path / "out")
    r = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=2",
              "--eval_interval=2", "--overwrite=True")
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["iter_num"] == 2


# Each bad input: one line on stderr and a non-zero exit status, and the case's folder exactly as it was (the
# checkpoint intact, no half-written file). Every case gets a folder {tmp} with data/, a copy of the fixture's
# dataset, and out/, a copy of its checkpoint at iter 40; the command line is --data_dir={tmp}/data
# --out_dir={tmp}/out, TINY, then the case's own settings. Exit status 2: a usage error, found before anything
# runs.
BAD_INPUTS = [  # (case, settings, message, exit status)
    *((arg, [arg], f"{arg}: must be > 0", 2) for arg in (
        "--block_len=0", "--n_head=0", "--eval_interval=0", "--eval_interval=-1", "--log_interval=0",
        "--eval_iters=0", "--grad_accum=0", "--batch_size=0", "--batch_size=-1", "--max_iters=-5",
        "--n_layer=0", "--seq_len=0")),
    ("--lr=-1", ["--lr=-1"], "--lr=-1.0: must be > 0", 2),
    ("--alpha=-1", ["--alpha=-1"], "--alpha=-1.0: must be >= 0", 2),
    ("--warmup_iters=-10", ["--warmup_iters=-10"], "--warmup_iters=-10: must be >= 0", 2),
    ("min_lr above lr", ["--min_lr=0.1"], "--min_lr=0.1 is above --lr=0.003", 2),
    ("beta2=1", ["--beta2=1.0"], "--beta2=1.0: must be in [0, 1)", 2),
    ("unknown setting", ["--n_layers=2"], "unknown setting '--n_layers=2' (did you mean --n_layer?)", 2),
    ("value after a space", ["--out_dir", "out"], "--out_dir needs its value after '=', as in --out_dir=", 2),
    ("wrong type", ["--batch_size=2.5"], "--batch_size=2.5: expected int", 2),
    ("wrong choice", ["--objective=diffusion"], "expected one of 'tidar', 'ar'", 2),
    ("fresh run over a checkpoint", [],
     "{tmp}/out/ckpt.pt already exists: continue it with --init_from=resume, train into another --out_dir, "
     "or replace it with --overwrite=True", 1),
    ("unwritable out_dir", ["--out_dir={tmp}/data/meta.json/out"],
     "cannot write to --out_dir={tmp}/data/meta.json", 1),
    ("read-only out_dir", ["--out_dir={tmp}/ro"],
     "cannot write to --out_dir={tmp}/ro (Permission denied)", 1),
    ("no room for a checkpoint", ["--out_dir={tmp}/new"], "MB free, and a checkpoint needs about", 1),
    ("disk full while saving", ["--init_from=resume", "--max_iters=44", "--eval_interval=4"],
     "at iter 44 (No space left on device); the last checkpoint is {tmp}/out/ckpt.pt (iter 40), untouched",
     1),
    ("missing dataset", ["--data_dir={tmp}/nowhere", "--out_dir={tmp}/new"], "no dataset in", 2),
    ("truncated train.bin", ["--out_dir={tmp}/new"], "train.bin ends in half a token", 1),
    ("missing train.bin", ["--out_dir={tmp}/new"], "train.bin is missing: the dataset in", 1),
    ("missing val.bin", ["--out_dir={tmp}/new"], "val.bin is missing: the dataset in", 1),
    ("damaged meta.json", ["--out_dir={tmp}/new"], "meta.json is not a complete meta.json", 1),
    ("unreadable checkpoint", ["--init_from=resume"], "cannot read checkpoint", 1),
    ("incompatible checkpoint", ["--init_from=resume", "--max_iters=60", "--n_layer=2"],
     "n_layer=1 in the checkpoint but 2 now", 1),
    ("foreign checkpoint", ["--init_from=resume"], "is incompatible: it lacks", 1),
    ("finished checkpoint", ["--init_from=resume"],
     "is already at iter 40 of --max_iters=40: raise --max_iters", 1),
    ("nan loss", ["--init_from=resume", "--lr=1e30", "--max_iters=60", "--log_interval=1"],
     "training diverged", 1),
    ("Ctrl-C in training", ["--init_from=resume", "--max_iters=60"],
     "interrupted at iter 41; the last checkpoint is {tmp}/out/ckpt.pt (iter 40)", 130),
    ("Ctrl-C in evaluation", ["--init_from=resume", "--max_iters=60", "--eval_interval=4"],
     "interrupted at iter 44; the last checkpoint is {tmp}/out/ckpt.pt (iter 40)", 130),
    ("Ctrl-C while saving", ["--init_from=resume", "--max_iters=44", "--eval_interval=4"],
     "interrupted at iter 44; the last checkpoint is {tmp}/out/ckpt.pt (iter 40)", 130),
    ("a dataset too small", ["--data_dir={tmp}/small", "--out_dir={tmp}/new"],
     "{tmp}/small/train.bin holds 1 tokens, fewer than seq_len + 1 = 33: prepare the dataset from more "
     "text", 1),
    ("ar_iters: no TiDAR step left", ["--ar_iters=40", "--max_iters=40"],
     "--ar_iters=40 leaves no TiDAR step in --max_iters=40: lower it (0 = TiDAR from scratch)", 2),
    ("init_from: no checkpoint", ["--init_from={tmp}/nowhere", "--out_dir={tmp}/new"],
     "--init_from={tmp}/nowhere: there is no checkpoint {tmp}/nowhere/ckpt.pt; pass 'scratch', 'resume' or "
     "the --out_dir of a train.py run", 2),
    ("init_from: damaged checkpoint", ["--init_from={tmp}/junk", "--out_dir={tmp}/new"],
     "cannot read checkpoint {tmp}/junk/ckpt.pt (UnpicklingError): it is damaged or not from train.py; pass "
     "the --out_dir of another train.py run", 1),
    ("init_from: another shape", ["--init_from={tmp}/out", "--out_dir={tmp}/new", "--n_layer=2"],
     "checkpoint {tmp}/out/ckpt.pt is incompatible with this run: n_layer=1 in the checkpoint but 2 now; "
     "train with its n_layer, n_head and n_embd, on a dataset of its tokenizer", 1),
    ("init_from: another tokenizer",
     ["--init_from={tmp}/out", "--out_dir={tmp}/new", "--data_dir={tmp}/bytes"],
     "tokenizer='code' in the checkpoint but 'byte' now", 1),
    ("Ctrl-C while preparing data", ["--data_dir={tmp}/pycode", "--out_dir={tmp}/new"],
     "interrupted while preparing {tmp}/pycode (nothing of it was kept; the next run prepares it again); "
     "no checkpoint was written", 130),
]
SETUP = {  # what the case breaks in its folder first
    "truncated train.bin": lambda tmp: open(tmp / "data" / "train.bin", "ab").write(b"\0"),
    "missing train.bin": lambda tmp: os.remove(tmp / "data" / "train.bin"),
    "missing val.bin": lambda tmp: os.remove(tmp / "data" / "val.bin"),
    "damaged meta.json": lambda tmp: (tmp / "data" / "meta.json").write_text('{"vocab_size": 257, "eot'),
    "unreadable checkpoint": lambda tmp: (tmp / "out" / "ckpt.pt").write_bytes(b"not a checkpoint"),
    "foreign checkpoint": lambda tmp: torch.save({"state_dict": {}}, tmp / "out" / "ckpt.pt"),
    "a dataset too small": lambda tmp: (tmp / "small.txt").write_text("x")
    and prepare_file(tmp / "small.txt", tmp / "small"),
    "init_from: damaged checkpoint": lambda tmp: (tmp / "junk").mkdir()
    or (tmp / "junk" / "ckpt.pt").write_bytes(bytes(range(256)) * 4),
    "init_from: another tokenizer": lambda tmp: (tmp / "bytes.txt").write_text(python_like_text())
    and prepare_file(tmp / "bytes.txt", tmp / "bytes", tokenizer="byte"),
}
READ_ONLY = """
import builtins
real_open = builtins.open
def read_only(path, mode="r", *args, **kwargs):  # a folder ro/ where nothing may be written, even by root
    if "/ro/" in str(path) and mode[0] in "wax":
        raise PermissionError(13, "Permission denied", str(path))
    return real_open(path, mode, *args, **kwargs)
builtins.open = read_only
"""
PRELUDE = {  # what fails while it runs (Ctrl-C is a KeyboardInterrupt raised there)
    "read-only out_dir": READ_ONLY,
    "no room for a checkpoint": "import shutil, types\n"
                                "shutil.disk_usage = lambda path: types.SimpleNamespace(free=1)",
    "disk full while saving": fail_call("torch.save", 1, DISK_FULL, half_file=True),
    "Ctrl-C in training": fail_call("torch.optim.AdamW.step", 2, CTRL_C),
    # val batches 1-4 at iter 40, 9-12 at 44
    "Ctrl-C in evaluation": fail_call("tidar.tidar_loss", 10, CTRL_C),
    "Ctrl-C while saving": fail_call("torch.save", 1, CTRL_C, half_file=True),
    "Ctrl-C while preparing data": fail_call("tiktoken.Encoding.encode_ordinary_batch", 3, CTRL_C),
}


def files(folder):
    """Every file's bytes, and every folder (None): a run that stops early leaves no empty out_dir behind."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def bad_runs(trained, tmp_path_factory):
    """{case: (its folder, the files in it before, the run)}, the runs forked, three at a time."""
    data_dir, out_dir, _ = trained
    cases = {}
    for case, args, _, _ in BAD_INPUTS:
        tmp = tmp_path_factory.mktemp("bad")
        shutil.copytree(data_dir, tmp / "data")
        shutil.copytree(out_dir, tmp / "out")
        SETUP.get(case, lambda tmp: None)(tmp)
        args = [f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'out'}", *TINY,
                *(a.format(tmp=tmp) for a in args)]
        cases[case] = tmp, files(tmp), args
    runs, names = {}, list(cases)
    for i in range(0, len(names), 3):  # three at a time
        children = {case: start_script("train.py", *cases[case][2], prelude=PRELUDE.get(case, ""))
                    for case in names[i : i + 3]}
        runs.update({case: child.wait() for case, child in children.items()})
    return {case: (tmp, before, runs[case]) for case, (tmp, before, _) in cases.items()}


@pytest.mark.parametrize("case,message,code", [(case, message, code) for case, _, message, code in
                                               BAD_INPUTS])
def test_bad_input_one_line_and_nothing_changed(bad_runs, case, message, code):
    tmp, before, r = bad_runs[case]
    assert r.returncode == code, r.stderr
    assert len(r.stderr.splitlines()) == 1 and message.format(tmp=tmp) in r.stderr
    assert r.stderr.startswith("train.py: interrupted" if code == 130 else "train.py: error: ")
    assert files(tmp) == before  # the checkpoint as it was, no half-written file or probe left behind
    if code == 2:
        assert r.stdout == ""  # stopped before anything else happened


# --- conftest's run_script, which the command-line tests above use


LAUNCHED = {  # small scripts: what each shows of the interpreter that runs it
    "ok.py": "import atexit, os, sys\natexit.register(print, 'at exit')\nprint(sys.argv[1:], os.getcwd(), "
             "os.environ['GREETING'])\nprint('to stderr', file=sys.stderr)",
    "message.py": "import sys\nprint('out')\nsys.exit(\"prepare.py: error: 'x' is not there\")",
    "status.py": "import sys\nsys.exit(3)",
    "error.py": "def f():\n    raise ValueError('x')\nf()",
    "ctrl_c.py": "import atexit\natexit.register(print, 'at exit')\nraise KeyboardInterrupt",
    "own_hook.py": "import sys\nsys.excepthook = lambda *e: print('one line', file=sys.stderr)\n"
                   "raise KeyboardInterrupt",
    "killed.py": "import os, signal\nprint('before', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)",
}


@pytest.mark.parametrize("name", list(LAUNCHED))
def test_run_script_gives_what_a_fresh_interpreter_gives(tmp_path, name):
    (tmp_path / name).write_text(LAUNCHED[name])
    args, env = (str(tmp_path / name), "--a=1", "ü"), {"GREETING": "hé"}
    forked, fresh = run_script(*args, env=env), interpreter(*args, env=env)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
