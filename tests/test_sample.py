"""TIDAR.md section 4, the decoding side: properties 4-10 and 12, the CLI and its bad inputs."""
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import sample
from conftest import BYTE_MODEL, write_checkpoint
import tidar
from sample import accept_probability, generate_ar, generate_tidar, residual
from tidar import GPT, GPTConfig, KVCache, causal_mask, decode_step_mask, decode_step_positions, prefill_mask, tidar_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Drafts(torch.nn.Module):
    """
    Wraps a model and overrides what its [MASK] slots say, to force the verifier's hand: 'oracle' drafts
    the true next tokens (everything is accepted), 'garbage' a wrong token (everything is rejected),
    'noisy' is right at some positions and wrong at others. The AR rows are untouched.
    """

    def __init__(self, model, truth, mode):
        super().__init__()
        self.model, self.config, self.truth, self.mode = model, model.config, truth, mode

    def forward(self, idx, pos, mask, cache=None, n_causal=0):
        logits = self.model(idx, pos, mask, cache, n_causal)
        for t in (idx[0] == self.config.mask_id).nonzero().flatten().tolist():
            p = int(pos[t])
            right = self.truth[p] if p < len(self.truth) else 0
            wrong = self.mode == "garbage" or (self.mode == "noisy" and p in (7, 8, 13, 21, 22, 23, 27))
            logits[0, t] = -30.0
            logits[0, t, (right + 1) % self.config.vocab_size if wrong else right] = 30.0
        return logits


def random_prompt(seed, n=5):
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- 4. training and decoding agree


def test_training_blocks_equal_prefill_forwards(tiny):
    S, B = 16, tiny.config.block_len
    x = torch.randint(0, 10, (1, S))
    doubled = tiny(*tidar_inputs(x, B, tiny.config.mask_id))[0]
    for b in range(S // B):
        P = b * B  # block b sees x_0 .. x_{bB-1}
        idx = torch.cat([x[0, :P], torch.full((B,), tiny.config.mask_id)])[None]
        prefill = tiny(idx, torch.arange(P + B), prefill_mask(P, B))[0]
        torch.testing.assert_close(doubled[S + P : S + P + B], prefill[P:], rtol=0, atol=1e-12)


def test_decode_blocks_equal_fresh_prefills(tiny):
    prompt, d = [1, 2, 3, 4, 5], [6, 7, 8, 9]
    k, m = len(d), tiny.config.mask_id
    cache = KVCache(tiny.config, 32, dtype=torch.float64)
    tiny(torch.tensor([prompt]), torch.arange(5), causal_mask(5), cache, n_causal=5)
    idx = torch.tensor([d + [m] * k * k])
    step = tiny(idx, decode_step_positions(5, k), decode_step_mask(5, k), cache, n_causal=k)[0]
    for b in range(1, k + 1):  # block b: the pre-draft for "d_0 .. d_{b-1} accepted"
        seen = prompt + d[:b]
        fresh = tiny(torch.tensor([seen + [m] * k]), torch.arange(len(seen) + k), prefill_mask(len(seen), k))[0]
        torch.testing.assert_close(step[k * b : k * (b + 1)], fresh[len(seen) :], rtol=0, atol=1e-12)


# --- 5, 6 and 10 inside a real generation: cached = uncached, exact rollback, one forward per step


def test_every_step_is_one_exact_cached_forward(tiny, monkeypatch):
    """After every rollback the cache holds exactly the K/V of a fresh causal forward over the committed
    tokens. (No [MASK] K/V can be left behind after a full acceptance: masks are never written, n_causal = k.)"""
    prompt, k = random_prompt(0), 4
    truth = prompt + generate_ar(tiny, prompt, 30)
    model = Drafts(tiny, truth, "noisy")  # a mix of zero, partial and full acceptances
    calls, rollbacks = [], []
    model.register_forward_hook(lambda mod, args, out: calls.append((args[0].clone(), args[1].clone(), out[0].clone())))
    original = KVCache.rollback

    def recording_rollback(cache, length):
        original(cache, length)
        rollbacks.append((length, cache.k[:, :, :, :length].clone(), cache.v[:, :, :, :length].clone()))

    monkeypatch.setattr(KVCache, "rollback", recording_rollback)
    out, stats = generate_tidar(model, prompt, 30, draft_len=k)
    assert prompt + out == truth[: len(prompt) + 30]
    assert len(calls) == stats["forwards"] == 1 + len(stats["committed"]) == 1 + len(rollbacks)
    assert calls[0][0].shape[1] == len(prompt) + k  # prefill: the prompt and k masks
    assert all(c[0].shape[1] == k + k * k for c in calls[1:])  # each step: k + k*k queries
    assert all(1 <= c <= k for c in stats["committed"])
    assert {1, k} <= set(stats["committed"]) and len(set(stats["committed"])) >= 3  # zero, partial, full acceptance
    for (idx, pos, logits), (length, K, V) in zip(calls[1:], rollbacks):
        L = int(pos[0])
        seq = torch.tensor([truth[:L] + idx[0, :k].tolist()])  # committed prefix + d_0 .. d_{k-1}
        uncached = tiny(seq, torch.arange(L + k), causal_mask(L + k))[0]
        torch.testing.assert_close(logits[:k], uncached[L:], rtol=0, atol=1e-12)  # 5
        ref = KVCache(tiny.config, length, dtype=torch.float64)
        tiny(torch.tensor([truth[:length]]), torch.arange(length), causal_mask(length), ref, n_causal=length)
        torch.testing.assert_close(K, ref.k, rtol=0, atol=1e-12)  # 6
        torch.testing.assert_close(V, ref.v, rtol=0, atol=1e-12)


# --- 7. greedy is lossless


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["model", "oracle", "garbage", "noisy"])
def test_greedy_tidar_equals_greedy_ar(tiny, k, mode):
    for seed in range(3):
        torch.manual_seed(seed)
        model = GPT(tiny.config).double().eval()
        prompt = random_prompt(seed, n=1 + seed)
        ar = generate_ar(model, prompt, 24)
        drafter = model if mode == "model" else Drafts(model, prompt + ar, mode)
        out, stats = generate_tidar(drafter, prompt, 24, draft_len=k)
        assert out == ar, f"seed {seed}"
        if mode == "oracle":  # every step commits k (the last one may be cut by max_new_tokens)
            assert all(c == k for c in stats["committed"][:-1])
        if mode == "garbage":
            assert all(c == 1 for c in stats["committed"])


@pytest.mark.parametrize("mode", ["oracle", "garbage"])
def test_beta_zero_trusts_the_diffusion_slot(tiny, mode):
    # beta = 0: every target is slot 0 of a mask block, so the output is whatever the masks say
    prompt = random_prompt(5)
    truth = prompt + generate_ar(tiny, prompt, 20)
    out, _ = generate_tidar(Drafts(tiny, truth, mode), prompt, 20, draft_len=4, beta=0.0)
    shift = 1 if mode == "garbage" else 0
    assert out == [(t + shift) % tiny.config.vocab_size for t in truth[len(prompt) :]]


def test_empty_prompt_means_start_of_document(tiny):
    eot = tiny.config.eot_id
    assert generate_ar(tiny, [], 10) == generate_ar(tiny, [eot], 10)
    assert generate_tidar(tiny, [], 10)[0] == generate_tidar(tiny, [eot], 10)[0]


# --- 8. the rejection sampler, by exact enumeration


def output_distribution(p, q):
    """P(output = x) for one draft d ~ q, kept with min(1, p/q), else y ~ residual(p, q)."""
    out = torch.zeros_like(p)
    for d in range(len(q)):
        if q[d] > 0:
            a = accept_probability(p, q, d)
            out[d] += q[d] * a
            out += q[d] * (1 - a) * residual(p, q)
    return out


def test_rejection_sampler_is_exact():
    g = torch.Generator().manual_seed(0)
    rand = lambda: torch.rand(6, generator=g, dtype=torch.float64)
    one_hot = lambda i: torch.nn.functional.one_hot(torch.tensor(i), 6).double()
    r = rand()
    pairs = [
        (rand().softmax(0), rand().softmax(0)),  # random
        ((3 * rand()).softmax(0), (3 * rand()).softmax(0)),
        (one_hot(2), rand().softmax(0)),  # one-hot target
        (r.softmax(0), one_hot(4)),  # one-hot draft
        (r.softmax(0), r.softmax(0)),  # equal: no rejection, and no 0/0
        (torch.tensor([0.5, 0.5, 0, 0, 0, 0]).double(), torch.tensor([0, 0, 0.25, 0.25, 0.25, 0.25]).double()),  # disjoint
    ]
    for p, q in pairs:
        out = output_distribution(p, q)
        assert not out.isnan().any()
        torch.testing.assert_close(out, p, rtol=0, atol=1e-12)


# --- 9. sampling is lossless end to end


def sequence_probability(model, prompt, seq, temperature, top_k):
    """Exact probability that AR sampling produces seq (it may end early at <|endoftext|>)."""
    full = torch.tensor([prompt + seq])
    logits = model(full, torch.arange(full.size(1)), causal_mask(full.size(1)))[0]
    p = sample.probabilities(logits[len(prompt) - 1 : -1], temperature, top_k)  # (len(seq), V)
    return math.prod(p[i, t].item() for i, t in enumerate(seq))


@pytest.mark.parametrize("temperature,top_k,draft_len", [(1.0, None, 2), (0.8, 3, 3)])
def test_sampling_follows_the_ar_distribution(temperature, top_k, draft_len):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=5, eot_id=4, seq_len=16, block_len=draft_len, n_layer=1, n_head=1, n_embd=8)
    model = GPT(config).eval()
    with torch.no_grad():  # larger weights: peaked distributions, drafts often but not always accepted
        for p in model.parameters():
            p.mul_(3)
    prompt, n_new, N = [1, 2], draft_len + 1, 2000
    g = torch.Generator().manual_seed(1)
    counts, committed, forwards = {}, [], []
    for _ in range(N):
        out, stats = generate_tidar(model, prompt, n_new, draft_len=draft_len, temperature=temperature, top_k=top_k, generator=g)
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
        committed, forwards = committed + stats["committed"], forwards + [stats["forwards"]]
    assert 1 in committed and draft_len in committed  # rejections and bonus tokens both occurred
    assert max(forwards) >= 3  # and generations of several steps
    expected = {s: N * sequence_probability(model, prompt, list(s), temperature, top_k) for s in counts}
    assert sum(expected.values()) <= N * (1 + 1e-6)
    # chi-square over the outcomes seen; whatever probability they miss goes into one last bin
    bins = [(counts[s], expected[s]) for s in counts] + [(0, max(N - sum(expected.values()), 0.0))]
    big = [(o, e) for o, e in bins if e >= 5]
    small = [(o, e) for o, e in bins if e < 5]
    big.append((sum(o for o, _ in small), sum(e for _, e in small)))
    chi2 = sum((o - e) ** 2 / e for o, e in big if e > 0)
    df = len(big) - 1
    z = 3.72  # one-sided 1e-4 quantile of the normal; Wilson-Hilferty turns it into a chi-square one
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < limit, f"chi2 {chi2:.1f} >= {limit:.1f} with {df} degrees of freedom"


# --- 12. stopping


def test_endoftext_inside_accepted_drafts_ends_the_output(tiny):
    prompt = random_prompt(3)
    ar = generate_ar(tiny, prompt, 20)
    j = next(i for i in range(3, len(ar)) if ar[i] not in ar[:i])  # a token first produced mid-way
    tiny.config = replace(tiny.config, eot_id=ar[j])
    expected = ar[: j + 1]  # <|endoftext|> is kept, nothing after it
    assert generate_ar(tiny, prompt, 20) == expected
    out, stats = generate_tidar(Drafts(tiny, prompt + ar, "oracle"), prompt, 20, draft_len=8)
    assert out == expected and sum(stats["committed"]) > len(out)  # the step committed past it, then trimmed


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 23])
def test_max_new_tokens_is_exact(tiny, n):
    prompt = random_prompt(4)
    ar = generate_ar(tiny, prompt, 30)
    assert tiny.config.eot_id not in ar
    assert generate_ar(tiny, prompt, n) == ar[:n]
    out, stats = generate_tidar(Drafts(tiny, prompt + ar, "oracle"), prompt, n, draft_len=8)
    assert out == ar[:n] and stats["forwards"] == 1 + math.ceil((n - 1) / 8)


# --- bad requests


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(draft_len=0), "draft_len must be at least 1"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_k=0, temperature=1.0), "top_k must be at least 1"),
        (dict(beta=1.5), r"beta must lie in \[0, 1\]"),
        (dict(max_new_tokens=40), "exceeds the model's context of 48"),
        (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (dict(prompt_ids=[1, 11]), r"prompt token ids must lie in \[0, 11\)"),  # 11 is [MASK]
    ],
)
def test_bad_requests_fail_before_decoding(tiny, kwargs, message):
    kwargs = {"prompt_ids": [1, 2, 3], "max_new_tokens": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_tidar(tiny, **kwargs)


def test_ar_checks_its_context_too(tiny):
    generate_ar(tiny, [1, 2, 3], 45)  # AR needs no room for drafts
    with pytest.raises(ValueError, match="exceeds the model's context of 48"):
        generate_ar(tiny, [1, 2, 3], 46)


# --- the command line


def test_cli_end_to_end(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "prompt.txt").write_text("def fibonacci(n):\n")
    args = [sys.executable, "sample.py", "--out_dir", str(tmp_path), "--prompt", f"FILE:{tmp_path / 'prompt.txt'}"]
    run = subprocess.run(args + ["--max_new_tokens", "20", "--compare", "--show", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("step   1 | ") == 1 and "{+" in run.stdout  # --show, plain text when piped
    assert "def fibonacci(n):\n" in run.stdout
    assert "--- TiDAR: 20 new tokens" in run.stdout and "tokens/forward" in run.stdout
    assert "outputs identical: True" in run.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--draft_len", "0"], "draft_len must be at least 1"),
        (["--temperature", "-0.5"], "temperature must be >= 0"),
        (["--top_k", "0", "--temperature", "1"], "top_k must be at least 1"),
        (["--beta", "2"], "beta must lie in"),
        (["--max_new_tokens", "90"], "exceeds the model's context of 96"),
        (["--prompt", "FILE:/nonexistent/prompt.txt"], "cannot read prompt file"),
        (["--num_samples", "0"], "--num_samples must be at least 1"),
        (["--device", "tpu"], "--device=tpu is not available here"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, args, message):
    write_checkpoint(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main(sample.parser.parse_args(["--out_dir", str(tmp_path), "--device", "cpu", "--prompt", "x"] + args))
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_checkpoint_problems(tmp_path, capsys):
    def error(out_dir):
        with pytest.raises(SystemExit) as e:
            sample.main(sample.parser.parse_args(["--out_dir", str(out_dir), "--device", "cpu"]))
        assert e.value.code != 0
        return capsys.readouterr().err

    assert "train one first with `python train.py`" in error(tmp_path / "none")
    write_checkpoint(tmp_path / "bad", replace(BYTE_MODEL, vocab_size=300))
    assert "does not match its tokenizer" in error(tmp_path / "bad")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert "cannot load" in error(tmp_path / "junk")
