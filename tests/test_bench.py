"""experiments/: bench.py, ablations.py and reproduce.sh run end to end on the CPU with tiny models; their
figures are printed, not asserted. What ablations.py's table 5 computes offline (drafts beside one forward,
the AR model's marginals, the forwards of a decoding) is checked against decoding and brute force."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from dataclasses import replace

from conftest import BYTE_MODEL, ROOT, Drafts, random_prompt, run_script, scale_weights, write_checkpoint
from sample import generate_ar, generate_tidar
from tidar import GPT, causal_mask, prefill_mask, tidar_inputs

EXPERIMENTS = os.path.join(ROOT, "experiments")
sys.path.insert(0, EXPERIMENTS)  # as a script there finds its neighbours: ablations.py imports bench.py
import ablations  # noqa: E402
import bench  # noqa: E402
import rollouts  # noqa: E402

SMALL = ["--device", "cpu", "--draft_lens", "2,4", "--num_prompts", "2", "--batches", "1,3",
         "--prompt_len", "8", "--max_new_tokens", "16", "--cache_len", "16", "--max_queries", "128",
         "--train_batch", "2", "--repeats", "1"]


def run_bench(tmp_path, *args, prelude=""):  # started from another folder than the repository's root
    return run_script("experiments/bench.py", "--out_dir", str(tmp_path), "--data_dir", str(tmp_path), *args,
                      prelude=prelude, cwd=tmp_path)


def write_dataset(folder, n=500, tokenizer="byte"):
    """A val split of random bytes, and the meta.json that says which tokenizer made it."""
    np.random.default_rng(0).integers(0, 256, n).astype(np.uint16).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps(dict(tokenizer=tokenizer)))


def test_bench_runs_on_cpu(tmp_path):
    write_checkpoint(tmp_path)
    write_dataset(tmp_path)
    run = run_bench(tmp_path, *SMALL)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "(threads: " in out  # the thread count: the figures depend on it
    assert "TiDAR k=2" in out and "TiDAR k=4" in out
    assert out.count("True") == 2  # greedy TiDAR == greedy AR on every prompt, for each k
    # the batch sweep and where TiDAR stops winning
    assert "vs AR k=4" in out and out.count("TiDAR k=2: ") == 1
    assert "<- k + k*k for k = 4" in out and "beyond the model's context" in out
    assert "ms/iter" in out
    print(out)


def test_bench_prompts_from_a_folder(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "a.py").write_text("def f(x):\n    return x + 1\n" * 3)
    (tmp_path / "src" / "pkg" / "b.py").write_text("import os\n" * 5)
    (tmp_path / "src" / "notes.txt").write_text("not Python: not read")
    run = run_bench(tmp_path, *SMALL, "--prompts", str(tmp_path / "src"), "--sections", "1,3",
                    "--max_queries", "16")
    assert run.returncode == 0, run.stderr
    assert f"spread evenly over {tmp_path / 'src'}" in run.stdout and "1. decoding at batch 1" in run.stdout
    assert "2. total tokens/s" not in run.stdout and "4. training step" not in run.stdout  # --sections
    # 20 queries: beyond --max_queries
    assert "<- k + k*k for k = 2" in run.stdout and "k = 4" not in run.stdout


@pytest.mark.parametrize("case,extra,message", [
    ("no dataset", [], "no dataset in {tmp} (meta.json is missing) to take prompts from"),
    ("short val.bin", [], "too few for prompts of 8"),
    ("another tokenizer", [],
     "{tmp} was made with tokenizer 'code', but the model in {tmp} reads 'byte': pass the --data_dir it was "
     "trained on"),
    ("too long", ["--max_new_tokens", "200"],
     "exceeds the model's context of 96: use --max_new_tokens=80 or less"),
    ("bad dtype", ["--dtypes", "float33"], "--dtypes=float33: use float32, bfloat16 or float16"),
    ("int dtype", ["--dtypes", "int8"], "--dtypes=int8: use float32, bfloat16 or float16"),
    ("no repeats", ["--repeats", "0"], "--repeats=0: must be at least 1"),
    ("no new tokens", ["--max_new_tokens", "0"], "--max_new_tokens=0: must be at least 1"),
    ("bad list", ["--draft_lens", "4,x"], "--draft_lens=4,x: give comma-separated integers of at least 1"),
    ("bad section", ["--sections", "5"], "--sections=5: the sections are 1 to 4"),
    ("no prompts there", ["--prompts", "/nonexistent"], "--prompts=/nonexistent: no such file, nor a folder"),
])
def test_bench_bad_input(tmp_path, capsys, case, extra, message):
    write_checkpoint(tmp_path)
    if case != "no dataset":
        tokenizer = "code" if case == "another tokenizer" else "byte"
        write_dataset(tmp_path, 5 if case == "short val.bin" else 500, tokenizer)
    with pytest.raises(SystemExit) as e:
        bench.main(bench.parser.parse_args(["--out_dir", str(tmp_path), "--data_dir", str(tmp_path), *SMALL,
                                            *extra]))
    out, err = capsys.readouterr()
    assert e.value.code != 0 and len(err.splitlines()) == 1 and message.format(tmp=tmp_path) in err
    assert out == ""  # found before anything was measured


def test_bench_ctrl_c_is_one_line(tmp_path):
    write_checkpoint(tmp_path)
    write_dataset(tmp_path)
    prelude = "import tidar\ndef stop(*a, **k): raise KeyboardInterrupt\ntidar.GPT.forward = stop"
    run = run_bench(tmp_path, *SMALL, prelude=prelude)
    assert run.stderr == "bench.py: interrupted\n" and run.returncode == -signal.SIGINT


def test_ablations_run_on_cpu(tmp_path):
    for name, config in [("main", BYTE_MODEL), ("b2", replace(BYTE_MODEL, block_len=2)),
                         ("drafter", replace(BYTE_MODEL, n_embd=8, n_head=1))]:
        write_checkpoint(tmp_path / name, config)
    for mix in (0.0, 1.0):  # table 6 reads how each was trained, as train.py and rollouts.py record it
        write_checkpoint(tmp_path / f"mix{mix}")
        ckpt = torch.load(tmp_path / f"mix{mix}" / "ckpt.pt", weights_only=True)
        ckpt.update(iter_num=30, train_config=dict(objective="tidar", ar_iters=20, rollout=mix))
        torch.save(ckpt, tmp_path / f"mix{mix}" / "ckpt.pt")
    write_dataset(tmp_path)
    args = ["--out_dir", str(tmp_path / "main"), "--block_dirs", f"{tmp_path / 'b2'},{tmp_path / 'main'}",
            "--target_dirs", f"{tmp_path / 'mix0.0'},{tmp_path / 'mix1.0'}", "--val_windows", "2",
            "--drafter_dir", str(tmp_path / "drafter"), "--data_dir", str(tmp_path), "--device", "cpu",
            "--draft_lens", "2,4", "--speculative_lens", "1,3", "--num_prompts", "1", "--prompt_len", "8",
            "--max_new_tokens", "8"]
    # a real interpreter, from another folder: ablations.py must find the root's modules and bench.py itself
    run = subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "ablations.py"), *args], cwd=tmp_path,
                         capture_output=True, text=True)
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
    diffusion = next(line for line in lines if line.lstrip().startswith("diffusion ")).split()[-1]
    assert any(line.lstrip().startswith("AR marginals ") for line in lines)
    # table 5 counts as decoding does
    assert f"generate_tidar itself: {diffusion} tokens per forward" in run.stdout
    # table 6: each checkpoint greedy and sampled, greedy outputs equal to AR's, the agreement by offset
    rows = [line.split() for line in lines if line.split()[:1] in (["mix0.0"], ["mix1.0"])]
    assert [(r[0], r[3], r[5], r[6]) for r in rows] == [  # name, 'AR 20 + TiDAR 10', rollout
        (name, "+", "10", mix) for name, mix in [("mix0.0", "0"), ("mix1.0", "1")] for _ in (0, 1)]
    assert [r[8] for r in rows] == ["0", "0.8"] * 2 and all(len(r) == 13 for r in rows)  # T, then 2 per k
    assert not any(cell.endswith("!") for r in rows for cell in r)
    assert [line.split(",")[-1].split()[:1] for line in lines if "drafts that are the greedy token" in line] \
        == [["mix0.0:"], ["mix1.0:"]]
    print(run.stdout)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("mode", ["model", "noisy", "oracle"])
def test_target_counts_forwards_as_decoding_does(tiny, k, mode):
    """Table 5 counts forwards offline, from the drafts of a block at every place one can start; with the
    model's own drafts that is generate_tidar's count, and each step's drafts are the ones it fed, whether
    drafts are rejected, partly or all accepted, and whether the text ends at max_new_tokens or at
    <|endoftext|>."""
    scale_weights(tiny, 2)  # drafts the context moves, some right; distributions not yet peaked
    for seed, max_new in [(0, 21), (1, 22)]:
        prompt = random_prompt(seed, n=3 + seed)
        text = generate_ar(tiny, prompt, max_new)
        # the second <|endoftext|>: a token of the text, where the text now ends early
        for eot in (tiny.config.eot_id, next(tok for tok in text[5:] if tok not in text[:5])):
            model = GPT(replace(tiny.config, eot_id=eot)).double().eval()
            model.load_state_dict(tiny.state_dict())
            seq = prompt + generate_ar(model, prompt, max_new)
            assert len(seq) - len(prompt) == (max_new if eot == tiny.config.eot_id else text.index(eot) + 1)
            drafter = model if mode == "model" else Drafts(model, [seq], [mode])
            drafts = ablations.diffusion_drafts(drafter, seq, range(len(prompt), len(seq)), k)
            _, stats = generate_tidar(drafter, prompt, max_new, draft_len=k)
            assert ablations.forwards_needed(seq, len(prompt), drafts, k) == stats["forwards"], f"seed {seed}"
            L = len(prompt)
            for d, n, _ in stats["trace"]:
                assert drafts[L][1:] == d[1:]
                L += n + 1


def test_side_forward_is_a_plain_forward_of_each_branch(tiny):
    """Each group beside table 5's one forward gets the logits of a forward of its own context alone: a path,
    a causal forward of seq[:t] and the path; a block of [MASK]s, a prefill of seq[:t] and the block."""
    seq, m = random_prompt(1, n=9), tiny.config.mask_id
    groups = [(2, [3, 4, 5]), (3, [m] * 4), (7, [1]), (9, [m] * 4), (9, [6, 2]), (1, [m] * 2)]
    for (t, tokens), logits in zip(groups, ablations.side_forward(tiny, seq, groups)):
        x = torch.tensor([seq[:t] + tokens])
        mask = prefill_mask(t, len(tokens)) if tokens[0] == m else causal_mask(x.size(1))
        torch.testing.assert_close(logits, tiny(x, torch.arange(x.size(1)), mask)[0, t:])


@pytest.mark.parametrize("beam", [3, 11 * 11])
def test_target_marginals_sum_over_the_beam(tiny, beam):
    """Table 5's drafts at offsets 1 and 2 are the argmax of the AR model's marginal, summed over the `beam`
    most likely tokens, then pairs, after the context (all of them: the exact marginal): brute force, one
    causal forward for each pair of tokens."""
    scale_weights(tiny, 2)  # a context that moves the argmax, and distributions not yet peaked
    seq, V = random_prompt(0, n=8), tiny.config.vocab_size
    drafts, held = ablations.marginal_drafts(tiny, seq, range(1, 9), 3, beam=beam)
    mass = []
    for t in range(1, 9):
        # (V*V, 2): the tokens a at t, b at t + 1
        pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))
        x = torch.cat([torch.tensor(seq[:t]).expand(V * V, t), pairs], 1)
        p = torch.softmax(tiny(x, torch.arange(t + 2), causal_mask(t + 2)), -1)[:, t - 1 :]  # (V*V, 3, V)
        p_a = p[0, 0]  # the token at t, given seq[:t]
        kept_a = torch.zeros(V, dtype=torch.bool)
        kept_a[p_a.topk(min(beam, V)).indices] = True
        # p(a) p(b | a), kept a
        p_ab = p_a[pairs[:, 0]] * p[:, 1].gather(1, pairs[:, 1:])[:, 0] * kept_a[pairs[:, 0]]
        kept_ab = torch.zeros(V * V, dtype=torch.bool)
        kept_ab[p_ab.topk(beam).indices] = True
        offset1 = (p_a * kept_a)[:, None] * p[::V, 1]  # rows a = 0 .. V-1: p(a) p(. | a)
        offset2 = (p_ab * kept_ab)[:, None] * p[:, 2]
        assert drafts[t] == [None, offset1.sum(0).argmax().item(), offset2.sum(0).argmax().item()]
        mass.append([p_a[kept_a].sum().item(), p_ab[kept_ab].sum().item()])
    assert held == pytest.approx(torch.tensor(mass).mean(0).tolist())
    if beam == V * V:
        assert held == pytest.approx([1.0, 1.0])


PHASES = ["a-gpu-tests", "b-train", "c1-bench-val", "c2-bench-outside", "c3-bench-sweeps", "d-bench-training",
          "e-ar-baseline"]


def reproduce(out, **env):  # started from out's folder, not the repository's
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", **env}
    script = os.path.join(EXPERIMENTS, "reproduce.sh")
    return subprocess.run(["bash", script, "--smoke", str(out)], cwd=out.parent, env=env, capture_output=True,
                          text=True)


def summary_rows(out):
    lines = (out / "summary.md").read_text().splitlines()
    return {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in lines if line.startswith("| ") and
            not line.startswith(("| phase", "| (a)", "| c, d"))}


# --- rollouts.py: the masks trained toward the model's own greedy rollouts (beyond the paper)


def greedy_ar(model, prefix, n):
    """Plain greedy AR decoding, the slow way: a whole causal forward for every token."""
    seq = list(prefix)
    for _ in range(n):
        T = len(seq)
        logits = model(torch.tensor([seq]), torch.arange(T), causal_mask(T))
        seq.append(logits[0, -1].argmax().item())
    return seq[len(prefix) :]


@pytest.mark.parametrize("B", [1, 4, 16])
def test_rollout_labels_are_greedy_ar_decoding_of_each_blocks_prefix(tiny, B):
    config = replace(tiny.config, block_len=B)
    with torch.no_grad():  # sharper weights than an initialisation's: a key seen or not changes the argmax
        for p in tiny.parameters():
            p.mul_(8)
    x = torch.randint(0, 10, (6, 16))
    labels = rollouts.rollout_labels(tiny, config, x)
    assert labels.shape == x.shape and torch.equal(labels[:, :B], x[:, :B])  # block 0 has no prefix: data
    for row in range(6):
        for b in range(1, 16 // B):
            assert labels[row, b * B : (b + 1) * B].tolist() == greedy_ar(tiny, x[row, : b * B].tolist(), B)


def test_rollout_mask_against_a_slow_loop():
    """Each round's pattern from its definition: the cache holds S clean tokens, then round by round one token
    per branch (branch i, of block i+1, at entry S + r'*m + i); a branch sees the clean tokens before its
    block, and its own tokens up to this round's."""
    for S, B in [(6, 2), (12, 3), (16, 4), (8, 1)]:
        m = S // B - 1
        for r in range(1, B):
            keys = S + (B - 1) * m + 5  # and some scratch entries past the last round
            slow = torch.zeros(m, keys, dtype=torch.bool)
            for i in range(m):
                slow[i, : (i + 1) * B] = True
                for rr in range(r):
                    slow[i, S + rr * m + i] = True
            fast = rollouts._mask(rollouts.rollout_allowed, m, keys, S=S, B=B, r=r)
            assert torch.equal(fast, slow), (S, B, r)


def test_agreement_counts_drafts_equal_to_the_greedy_text():
    seq, P = [0, 1, 2, 3, 4], 2  # seq[2:] the greedy text; blocks start at 2, 3, 4; offsets 1 and 2 (k = 3)
    drafts = {2: [None, 3, 9], 3: [None, 4, 0], 4: [None, 5, 5]}  # 3 = seq[3], right; 4 = seq[4], right
    assert ablations.agreement(seq, P, drafts, 3).tolist() == [2, 0]  # past the text's end counts nothing


def paper_terms(model, x, y, labels):
    """The AR term and the diffusion term against labels, written out from the README's loss."""
    S, V = x.size(1), model.config.vocab_size
    logits = model(*tidar_inputs(x, model.config.block_len, model.config.mask_id))
    ar = torch.nn.functional.cross_entropy(logits[:, :S].reshape(-1, V), y.reshape(-1))
    return ar, torch.nn.functional.cross_entropy(logits[:, S:].reshape(-1, V), labels.reshape(-1))


def test_rollout_labels_build_no_graph(tiny):
    """The rollouts are labels, computed without gradient: no forward inside them records a graph, even when
    the caller's is enabled, and the loss's gradient is the one with them given as plain data."""
    x = torch.randint(0, 10, (2, 17))
    x, y = x[:, :-1], x[:, 1:]
    seen = []
    hook = tiny.register_forward_hook(lambda m, args, out: seen.append(out.requires_grad))
    with torch.enable_grad():
        labels = rollouts.rollout_labels(tiny, tiny.config, x)
    hook.remove()
    assert seen and not any(seen) and not labels.requires_grad

    def grads(loss):
        tiny.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in tiny.parameters()]

    given = torch.tensor(labels.tolist())  # plain data
    ar, own = paper_terms(tiny, x, y, given)
    expected = grads((ar + own) / 2)
    for a, b in zip(grads(rollouts.training_loss(tiny, tiny.config, x, y, rollout=1.0)[0]), expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_rollout_off_is_the_papers_loss_bit_for_bit(tiny):
    x = torch.randint(0, 10, (2, 17))
    x, y = x[:, :-1], x[:, 1:]
    ar, diff = paper_terms(tiny, x, y, x)
    assert all(torch.equal(a, b) for a, b in zip(
        rollouts.training_loss(tiny, tiny.config, x, y, alpha=0.3, rollout=0.0),
        ((0.3 * ar + diff) / 1.3, ar, diff)))
    # rollout > 0: the diffusion term leans toward the rollouts by that weight
    _, own = paper_terms(tiny, x, y, rollouts.rollout_labels(tiny, tiny.config, x))
    assert not torch.isclose(own, diff)
    for mix in (0.5, 1.0):
        loss, _, d = rollouts.training_loss(tiny, tiny.config, x, y, alpha=0.3, rollout=mix)
        torch.testing.assert_close(d, (1 - mix) * diff + mix * own, rtol=1e-12, atol=0)
        torch.testing.assert_close(loss, (0.3 * ar + d) / 1.3, rtol=1e-12, atol=0)


def test_reproduce_smoke_runs_every_phase(tmp_path):
    """bash experiments/reproduce.sh --smoke: every phase of the GPU run, at tiny sizes on the CPU, each
    ending well, its results in a few small files; the models beside them."""
    r = reproduce(tmp_path / "results")
    assert r.returncode == 0, r.stdout + r.stderr
    assert summary_rows(tmp_path / "results") == dict.fromkeys(PHASES, "ok")
    assert sorted(os.listdir(tmp_path / "results")) == sorted([f"{p}.log" for p in PHASES] + ["summary.md"])
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "eval 20: val loss" in summary and "TiDAR k=4" in summary and "ms/iter" in summary
    assert {"ar", "tidar"} <= set(os.listdir(tmp_path / "results-models"))


def test_reproduce_goes_on_after_a_phase_fails_with_the_python_that_has_torch(tmp_path):
    """A phase that runs out of time is marked so, and the phases after it still run (or say why they cannot).
    In the same run: a `python` without the project's packages (as on a GPU machine whose python3 holds
    torch) is passed over for `python3`; with neither, one line says what to install."""
    fake = tmp_path / "bin"
    fake.mkdir()

    def without_packages(name):  # an interpreter that fails every import check
        (fake / name).write_text("#!/bin/sh\nexit 1\n")
        (fake / name).chmod(0o755)

    without_packages("python")
    python3 = os.path.join(os.path.dirname(sys.executable), "python3")
    path = os.pathsep.join([str(fake), os.path.dirname(sys.executable), os.environ["PATH"]])
    r = reproduce(tmp_path / "results", PATH=path, LIMITS="1 1 60 60 60 60 60")  # a and b: one second each
    assert f"== a-gpu-tests (at most 1s): {python3} -m pytest" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 1
    rows = summary_rows(tmp_path / "results")
    assert rows == {"a-gpu-tests": "ran out of time", "b-train": "ran out of time", "e-ar-baseline": "ok"}
    assert "| c, d | skipped: b left no checkpoint |" in (tmp_path / "results" / "summary.md").read_text()
    without_packages("python3")
    r = reproduce(tmp_path / "results", PATH=f"{fake}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert r.returncode == 1 and r.stdout.splitlines() == [
        "reproduce.sh: error: neither python nor python3 has torch, numpy, tiktoken and pytest: pip install "
        "-r requirements.txt"]
