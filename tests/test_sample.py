"""
Decoding, as a specification, most important first: greedy TiDAR is AR greedy token for token; sampling
follows the AR distribution exactly; a training block is a decode block; inside real generations every
step is one cached forward equal to an uncached one, rollback is exact and the rows of a batch are
independent; stopping; the paper's rule against the lossless one; speculative decoding. Then the
machinery (every step the same graph, replayed from an emulated CUDA graph), bad requests and the CLI.
"""
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sample
from conftest import BYTE_MODEL, ROOT, Drafts, random_prompt, run_script, scale_weights, write_checkpoint
from sample import accept_probability, generate_ar, generate_tidar, residual
from tidar import GPT, GPTConfig, KVCache, causal_mask, decode_step_mask, decode_step_positions, prefill_mask
from tidar import tidar_inputs

sys.path.insert(0, os.path.join(ROOT, "experiments"))
from ablations import generate_speculative  # noqa: E402  (the paper's baseline, which ablations.py measures)


# --- greedy is lossless


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["model", "oracle", "garbage", "noisy"])
def test_greedy_tidar_equals_greedy_ar(tiny, k, mode):
    for seed in range(3):
        torch.manual_seed(seed)
        model = GPT(tiny.config).double().eval()
        prompt = random_prompt(seed, n=1 + seed)
        ar = generate_ar(model, prompt, 24)
        drafter = model if mode == "model" else Drafts(model, [prompt + ar], [mode])
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
    out, _ = generate_tidar(Drafts(tiny, [truth], [mode]), prompt, 20, draft_len=4, beta=0.0)
    shift = 1 if mode == "garbage" else 0
    assert out == [(t + shift) % tiny.config.vocab_size for t in truth[len(prompt) :]]


# --- the rejection sampler, by exact enumeration


def output_distribution(p, q):
    """P(output = x) for one draft d ~ q, kept with min(1, p/q), else y ~ residual(p, q)."""
    out = torch.zeros_like(p)
    for d in range(len(q)):
        if q[d] > 0:
            a = accept_probability(p, q, torch.tensor(d))
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
        (torch.tensor([0.5, 0.5, 0, 0, 0, 0]).double(),
         torch.tensor([0, 0, 0.25, 0.25, 0.25, 0.25]).double()),
    ]  # the last pair has disjoint supports
    for p, q in pairs:
        out = output_distribution(p, q)
        assert not out.isnan().any()
        torch.testing.assert_close(out, p, rtol=0, atol=1e-12)


def test_verify_is_exact_over_every_draw():
    """verify itself (leading run of acceptances, residual or bonus, the uniforms it uses, the inverse-CDF
    draw) over every pair of drafts and every point of a uniform grid, each row of one batch: the first new
    token follows p_0, the next (once d_1 is kept) p_1, the bonus p_2. Quarters, so the grid's counts are
    exact."""
    # targets after d_0, d_1, d_2
    p = torch.tensor([[2, 1, 1], [0, 3, 1], [1, 1, 2]], dtype=torch.float64) / 4
    q = torch.tensor([[1, 2, 1], [2, 2, 0]], dtype=torch.float64) / 4  # d_1 ~ q_0, d_2 ~ q_1
    grid = (torch.arange(4, dtype=torch.float64) + 0.5) / 4
    rows = [(d, u, q[0, d[0]] * q[1, d[1]] / 64) for d in [(a, b) for a in range(3) for b in range(2)]
            for u in torch.cartesian_prod(grid, grid, grid)]
    drafts, u = torch.tensor([d for d, _, _ in rows]), torch.stack([u for _, u, _ in rows])
    n, y = sample.verify(p.expand(len(rows), -1, -1), q.expand(len(rows), -1, -1), drafts, u)
    committed = [d[:m] + [t] for d, m, t in zip(drafts.tolist(), n.tolist(), y.tolist())]
    for i in range(3):  # the (i+1)-th new token, given the i before it were drafts that were kept
        seen = torch.zeros(3, dtype=torch.float64)
        for (_, _, w), c, m in zip(rows, committed, n.tolist()):
            if m >= i:
                seen[c[i]] += w
        torch.testing.assert_close(seen / seen.sum(), p[i], rtol=0, atol=1e-12)


# --- sampling is lossless end to end


def sequence_probabilities(model, prompt, seqs, temperature, top_k):
    """Exact probability that AR sampling produces each of seqs (each may end early at <|endoftext|>), from
    one causal forward of them all, each padded after its end (which a causal forward never looks at)."""
    n = max(map(len, seqs))
    full = torch.tensor([prompt + list(seq) + [0] * (n - len(seq)) for seq in seqs])  # (len(seqs), P + n)
    logits = model(full, torch.arange(full.size(1)), causal_mask(full.size(1)))
    p = sample.probabilities(logits[:, len(prompt) - 1 : -1], temperature, top_k)  # (len(seqs), n, V)
    # (len(seqs), n): each token's probability
    p = p.gather(-1, full[:, len(prompt) :, None])[..., 0].double()
    ended = torch.arange(n) >= torch.tensor([len(seq) for seq in seqs])[:, None]
    return p.masked_fill(ended, 1.0).prod(dim=1).tolist()


def peaked_gpt(seed, **kw):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=5, eot_id=4, seq_len=16, n_layer=1, n_head=1, n_embd=8, **kw)
    return scale_weights(GPT(config).eval(), 3)  # peaked distributions: drafts often but not always accepted


def test_drafts_are_verified_against_the_distribution_they_were_drawn_from(tiny, monkeypatch):
    """At every step, not only the prefill's: the q that verify() divides by is the one choose() drew the
    drafts from (the same temperature and top-k). A wrong q is lossy by a margin the sampling test below
    cannot see."""
    events, real_choose, real_verify = [], sample.choose, sample.verify

    def choose(logits, temperature, top_k, u):
        tokens, q = real_choose(logits, temperature, top_k, u)
        events.append(("drawn", tokens.clone(), q.clone()))
        return tokens, q

    def verify(p, q, drafts, u):
        events.append(("verified", drafts.clone(), q.clone()))
        return real_verify(p, q, drafts, u)

    monkeypatch.setattr(sample, "choose", choose)
    monkeypatch.setattr(sample, "verify", verify)
    generate_tidar(tiny, [[1, 2, 3], [4]], 20, draft_len=3, temperature=0.8, top_k=3,
                   generator=torch.Generator().manual_seed(0))
    verified = [(n, drafts, q) for n, (what, drafts, q) in enumerate(events) if what == "verified"]
    assert len(verified) >= 3
    for n, drafts, q in verified:  # the last draw of (N, k-1) tokens before it: the drafts it verifies
        _, drawn, drawn_from = [e for e in events[:n] if e[0] == "drawn" and e[1].shape == drafts.shape][-1]
        assert torch.equal(drawn, drafts) and torch.equal(drawn_from, q)


@pytest.mark.parametrize("decoder", ["tidar", "speculative"])
@pytest.mark.parametrize("temperature,top_k,draft_len", [(1.0, None, 2), (0.8, 3, 3)])
def test_sampling_follows_the_ar_distribution(decoder, temperature, top_k, draft_len):
    model, N = peaked_gpt(0, block_len=draft_len), 2000
    # Every row of a batch is one sample: two prompts of different lengths side by side, N rows each.
    prompts, n_new, g = [[1, 2], [3]] * N, draft_len + 2, torch.Generator().manual_seed(1)
    if decoder == "tidar":
        outs, stats = generate_tidar(model, prompts, n_new, draft_len=draft_len, temperature=temperature,
                                     top_k=top_k, generator=g)
        bonus = draft_len  # a step commits up to k tokens
    else:
        outs, stats = generate_speculative(model, peaked_gpt(1), prompts, n_new, draft_len=draft_len,
                                           temperature=temperature, top_k=top_k, generator=g)
        bonus = draft_len + 1  # up to k + 1
    committed = [c for st in stats for c in st["committed"]]
    assert 1 in committed and bonus in committed  # rejections and bonus tokens both occurred
    assert max(st["forwards"] for st in stats) >= 3  # and generations of several steps
    for prompt in ([1, 2], [3]):
        counts = {}
        for p, out in zip(prompts, outs):
            if p == prompt:
                counts[tuple(out)] = counts.get(tuple(out), 0) + 1
        # chi-square over every sequence AR sampling can produce (bins fixed before looking at the samples):
        # those expected at least 5 times each in a bin, the rest together in one
        seqs = list(all_sequences(model.config.vocab_size, n_new, model.config.eot_id))
        probabilities = sequence_probabilities(model, prompt, seqs, temperature, top_k)
        expected = {s: N * p for s, p in zip(seqs, probabilities)}
        assert set(counts) <= set(expected) and sum(expected.values()) == pytest.approx(N)
        big = [(counts.get(s, 0), e) for s, e in expected.items() if e >= 5]
        small = [(counts.get(s, 0), e) for s, e in expected.items() if e < 5]
        big.append((sum(o for o, _ in small), sum(e for _, e in small)))
        chi2 = sum((o - e) ** 2 / e for o, e in big if e > 0)
        df = len(big) - 1
        z = 3.72  # one-sided 1e-4 quantile of the normal; Wilson-Hilferty turns it into a chi-square one
        limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
        assert chi2 < limit, f"prompt {prompt}: chi2 {chi2:.1f} >= {limit:.1f} with {df} degrees of freedom"


def all_sequences(V, n, eot_id, prefix=()):
    """Every output of at most n tokens that stops only at <|endoftext|> or at n."""
    for t in range(V):
        s = prefix + (t,)
        yield from [s] if t == eot_id or len(s) == n else all_sequences(V, n, eot_id, s)


def test_a_tiny_temperature_is_greedy(tiny):
    """As the temperature goes to 0, sampling becomes greedy; a tiny one must not overflow on the way."""
    p = sample.probabilities(torch.tensor([[50.0, 10.0, -3.0, 49.9]]), 1e-37, None)
    assert p.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    prompt = random_prompt(6)
    greedy = generate_ar(tiny, prompt, 16)
    g = torch.Generator().manual_seed(0)
    assert generate_tidar(tiny, prompt, 16, temperature=1e-30, generator=g)[0] == greedy


# --- training and decoding agree


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
    cache = KVCache(tiny.config, 1, 32, dtype=torch.float64)
    tiny(torch.tensor([prompt]), torch.arange(5), causal_mask(5, 0, 32), cache)
    cache.length.fill_(5)
    idx = torch.tensor([d + [m] * k * k])
    step = tiny(idx, decode_step_positions(cache.length, k), decode_step_mask(cache.length, k, 32), cache)[0]
    for b in range(1, k + 1):  # block b: the pre-draft for "d_0 .. d_{b-1} committed"
        seen = prompt + d[:b]
        x = torch.tensor([seen + [m] * k])
        fresh = tiny(x, torch.arange(len(seen) + k), prefill_mask(len(seen), k))[0]
        torch.testing.assert_close(step[k * b : k * (b + 1)], fresh[len(seen) :], rtol=0, atol=1e-12)


# --- inside real generations: cached = uncached, exact rollback, one forward per step,
# and rows of a batch as independent as if each were decoded alone


def fresh_kv(model, tokens):
    """K/V of one causal forward over `tokens`, with no cache: what a cache holding them must equal."""
    n = len(tokens)
    cache = KVCache(model.config, 1, n, dtype=torch.float64)
    model(torch.tensor([tokens]), torch.arange(n), causal_mask(n, 0, cache.max_len), cache)
    return cache.keys[:, 0, :, :n], cache.values[:, 0, :, :n]


@pytest.mark.parametrize("batch", [
    [(0, 5, "noisy")],  # one prompt: a mix of zero, partial and full acceptances
    [(0, 9, "oracle"), (1, 2, "garbage"), (2, 4, "noisy")],  # ragged: one row accepts all, one nothing
])
def test_every_step_is_one_exact_cached_forward(tiny, batch):
    """
    Before every forward the cache holds, for every live row, exactly the K/V of a fresh causal forward over
    that row's committed tokens; the step's AR rows equal an uncached forward; and nothing else was
    ever kept (no rejected draft, no [MASK]): after zero, partial and full acceptances alike.
    """
    k, n_new = 4, 30
    prompts = [random_prompt(seed, n) for seed, n, _ in batch]
    truths = [p + generate_ar(tiny, p, n_new) for p in prompts]
    model = Drafts(tiny, truths, [mode for _, _, mode in batch])
    # per forward: its input ids, and the cache as it was before it (lengths, K, V), then its logits
    calls = []

    def record(mod, args, out):
        idx, pos, mask, cache = args
        calls[-1] = (idx.clone(), *calls[-1], out.clone())

    snapshot = lambda cache: (cache.length.clone(), cache.keys.clone(), cache.values.clone())
    model.register_forward_pre_hook(lambda mod, args: calls.append(snapshot(args[3])))
    model.register_forward_hook(record)
    outs, stats = generate_tidar(model, prompts if len(batch) > 1 else prompts[0], n_new, draft_len=k)
    outs, stats = (outs, stats) if len(batch) > 1 else ([outs], [stats])
    assert [p + o for p, o in zip(prompts, outs)] == [t[: len(p) + n_new] for p, t in zip(prompts, truths)]
    # the prefill and one forward per step (10 here)
    assert len(calls) == 1 + max(len(st["trace"]) for st in stats) == max(st["forwards"] for st in stats)
    # prefill: the prompts and k masks (and padding)
    assert calls[0][0].shape[1] == max(map(len, prompts)) + k
    assert all(c[0].shape[1] == k + k * k for c in calls[1:])  # each step: k + k*k queries
    for b, (prompt, truth, st) in enumerate(zip(prompts, truths, stats)):
        assert all(1 <= c <= k for c in st["committed"])
        mode = batch[b][2]
        if mode == "oracle":
            assert all(c == k for c in st["committed"][:-1])
        if mode == "garbage":
            assert set(st["committed"]) == {1}
        if mode == "noisy":
            assert {1, k} <= set(st["committed"]) and len(set(st["committed"])) >= 3
        # the steps it was live
        for s, (idx, length, K, V, logits) in enumerate(calls[1 : 1 + len(st["trace"])]):
            L = int(length[b])
            assert L == len(prompt) + sum(st["committed"][:s])
            ref_k, ref_v = fresh_kv(tiny, truth[:L])
            # rollback is exact: the cache holds exactly the committed tokens' K/V
            torch.testing.assert_close(K[:, b, :, :L], ref_k, rtol=0, atol=1e-12)
            torch.testing.assert_close(V[:, b, :, :L], ref_v, rtol=0, atol=1e-12)
            d = idx[b, :k].tolist()
            assert d[0] == truth[L]  # d_0 was decided right
            uncached = tiny(torch.tensor([truth[:L] + d]), torch.arange(L + k), causal_mask(L + k))[0]
            torch.testing.assert_close(logits[b, :k], uncached[L:], rtol=0, atol=1e-12)  # cached = uncached


@pytest.mark.parametrize("decoder", ["ar", "tidar", "speculative"])
def test_batch_rows_equal_prompts_decoded_alone(tiny, decoder):
    torch.manual_seed(7)
    drafter = GPT(replace(tiny.config, n_layer=1, n_embd=8, n_head=1)).double().eval()
    prompts = [random_prompt(1, 7), random_prompt(2, 1), random_prompt(3, 12), []]
    alone = [generate_ar(tiny, p, 20) for p in prompts]
    if decoder == "ar":
        assert generate_ar(tiny, prompts, 20) == alone
        return
    if decoder == "tidar":
        modes = ["oracle", "garbage", "model", "noisy"]
        model = Drafts(tiny, [(p or [tiny.config.eot_id]) + a for p, a in zip(prompts, alone)], modes)
        outs, stats = generate_tidar(model, prompts, 20, draft_len=4)
        alone_steps = [generate_tidar(Drafts(tiny, [model.truths[b]], [modes[b]]), p, 20, draft_len=4)[1]
                       for b, p in enumerate(prompts)]
        assert [st["committed"] for st in alone_steps] == [st["committed"] for st in stats]  # the same steps
    else:
        outs, stats = generate_speculative(tiny, drafter, prompts, 20, draft_len=3)
        assert [generate_speculative(tiny, drafter, p, 20, draft_len=3)[1]["committed"] for p in prompts] == \
            [st["committed"] for st in stats]
    assert outs == alone


def test_one_host_read_per_step(tiny, monkeypatch):
    """A step reads back once (the tokens and the accepted counts, with .tolist()), and nothing in it waits
    on the device otherwise: on a GPU any other read (.item(), bool(tensor), ...) would be a sync."""
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)
        counted = lambda t, *a, _f=original, _n=name, **kw: reads.append(_n) or _f(t, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    forwards = []
    tiny.register_forward_hook(lambda *args: forwards.append(1))
    drafter = GPT(replace(tiny.config, n_layer=1)).double().eval()
    for decode in (lambda: generate_ar(tiny, [[1, 2], [3]], 9),
                   lambda: generate_tidar(tiny, [[1, 2], [3]], 9, draft_len=3, temperature=1.0),
                   lambda: generate_speculative(tiny, drafter, [[1, 2], [3]], 9, draft_len=2,
                                                temperature=1.0)):
        reads.clear(), forwards.clear()
        decode()
        assert len(forwards) >= 3 and reads == ["tolist"] * len(forwards)  # prefill, then each step


# --- stopping


def test_endoftext_inside_accepted_drafts_ends_the_output(tiny):
    prompt = random_prompt(3)
    ar = generate_ar(tiny, prompt, 20)
    j = next(i for i in range(3, len(ar)) if ar[i] not in ar[:i])  # a token first produced mid-way
    tiny.config = replace(tiny.config, eot_id=ar[j])
    expected = ar[: j + 1]  # <|endoftext|> is kept, nothing after it
    assert generate_ar(tiny, prompt, 20) == expected
    out, stats = generate_tidar(Drafts(tiny, [prompt + ar], ["oracle"]), prompt, 20, draft_len=8)
    assert out == expected and sum(stats["committed"]) > len(out)  # the step committed past it, then trimmed


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 23])
def test_max_new_tokens_is_exact(tiny, n):
    prompt = random_prompt(4)
    ar = generate_ar(tiny, prompt, 30)
    assert tiny.config.eot_id not in ar
    assert generate_ar(tiny, prompt, n) == ar[:n]
    out, stats = generate_tidar(Drafts(tiny, [prompt + ar], ["oracle"]), prompt, n, draft_len=8)
    assert out == ar[:n] and stats["forwards"] == 1 + math.ceil((n - 1) / 8)


# --- the two rules: the authors' released rule commits slot 0 of each block unverified


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("mode", ["model", "oracle", "garbage", "noisy"])
def test_paper_rule_equals_lossless_rule_at_beta_zero(tiny, k, mode):
    for seed in range(3):
        prompt = random_prompt(seed, n=2 + seed)
        model = tiny if mode == "model" else Drafts(tiny, [prompt + generate_ar(tiny, prompt, 24)], [mode])
        ours, ours_stats = generate_tidar(model, prompt, 24, draft_len=k, beta=0.0)
        paper, paper_stats = generate_tidar(model, prompt, 24, draft_len=k, beta=0.0, rule="paper")
        assert paper == ours and paper_stats["committed"] == ours_stats["committed"]


def test_only_the_lossless_rule_equals_ar_at_beta_one(tiny):
    prompt = random_prompt(4)
    ar = generate_ar(tiny, prompt, 20)
    # garbage drafts: every verification fails, so everything the paper's rule commits is some block's slot 0,
    # never checked, and never a token the AR model chose; ours corrects each one
    model = Drafts(tiny, [prompt + ar], ["garbage"])
    assert generate_tidar(model, prompt, 20, draft_len=4)[0] == ar
    paper, stats = generate_tidar(model, prompt, 20, draft_len=4, rule="paper")
    assert all(t != a for t, a in zip(paper, ar)) and set(stats["committed"]) == {1}
    # with the model's own drafts too: some seed's output leaves the AR path
    differs = []
    for seed in range(4):
        torch.manual_seed(seed)
        m = GPT(tiny.config).double().eval()
        p = random_prompt(seed)
        ar = generate_ar(m, p, 24)
        assert generate_tidar(m, p, 24)[0] == ar
        differs.append(generate_tidar(m, p, 24, rule="paper")[0] != ar)
    assert any(differs)


# --- speculative decoding (ablations.py's, the paper's baseline): lossless like TiDAR, one target forward
# of k + 1 tokens per step


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_speculative_equals_greedy_ar(tiny, k):
    torch.manual_seed(11)
    drafter = GPT(replace(tiny.config, n_layer=1, n_embd=8, n_head=1)).double().eval()
    calls = []
    for seed, target in enumerate([tiny, GPT(tiny.config).double().eval()]):
        target.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[1]))
        prompt = random_prompt(seed, n=1 + 3 * seed)
        ar = generate_ar(target, prompt, 24)
        for d in (drafter, target):  # a weak drafter, and the target drafting for itself (all accepted)
            calls.clear()
            out, stats = generate_speculative(target, d, prompt, 24, draft_len=k)
            assert out == ar
            assert all(1 <= c <= k + 1 for c in stats["committed"])
            assert stats["drafter_forwards"] == 1 + k * (stats["forwards"] - 1)
            if d is target:
                assert all(c == k + 1 for c in stats["committed"][:-1])
            else:  # the target: prefill, then one forward of k + 1 tokens per step
                assert calls == [len(prompt)] + [k + 1] * (stats["forwards"] - 1)


def test_the_drafter_sees_exactly_the_committed_text(tiny):
    """Each step the drafter starts from the committed tokens at their own positions, its cache holding
    exactly their K/V (it re-reads the last one with d_0, so that a rollback needs no bookkeeping)."""
    torch.manual_seed(11)
    drafter = GPT(replace(tiny.config, n_layer=1, n_embd=8, n_head=1)).double().eval()
    prompt = random_prompt(2, 6)
    truth = prompt + generate_ar(tiny, prompt, 30)
    starts = []

    def check(mod, args):
        idx, pos, mask, cache = args
        if idx.size(1) == 2:  # the first drafter forward of a step: [last committed token, d_0]
            L = int(cache.length[0])
            starts.append(L)
            assert pos[0].tolist() == [L, L + 1] and idx[0].tolist() == truth[L : L + 2]
            ref_k, ref_v = fresh_kv(drafter, truth[:L])
            torch.testing.assert_close(cache.keys[:, 0, :, :L], ref_k, rtol=0, atol=1e-12)
            torch.testing.assert_close(cache.values[:, 0, :, :L], ref_v, rtol=0, atol=1e-12)

    drafter.register_forward_pre_hook(check)
    out, stats = generate_speculative(tiny, drafter, prompt, 30, draft_len=3)
    assert prompt + out == truth
    assert starts == [len(prompt) - 1 + sum(stats["committed"][:s]) for s in range(len(stats["committed"]))]


def test_speculative_refuses_a_drafter_of_another_vocabulary(tiny):
    drafter = GPT(replace(tiny.config, vocab_size=12)).double()
    with pytest.raises(ValueError, match="drafter's vocabulary"):
        generate_speculative(tiny, drafter, [1, 2], 5)


def test_empty_prompt_means_start_of_document(tiny):
    eot = tiny.config.eot_id
    assert generate_ar(tiny, [], 10) == generate_ar(tiny, [eot], 10)
    assert generate_tidar(tiny, [], 10)[0] == generate_tidar(tiny, [eot], 10)[0]


# --- CUDA graphs: every step is the same graph, and a replayed step is the eager step (on the CPU,
# against an emulated graph; on a GPU, against a real one)


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 1, 2]]  # of different lengths: the rows' caches differ


class Recorder(TorchDispatchMode):
    """
    Writes down a step as a CUDA graph records it: every kernel with its shapes and arguments, where each
    tensor the step did not create itself is named by its address (a replay reads and writes the same
    memory, whatever Python would have passed). Two steps with the same record are the same graph.
    """

    def __init__(self):
        super().__init__()
        self.ops, self.made = [], set()

    def name(self, x):
        if not isinstance(x, torch.Tensor):
            return repr(x)
        address = x.untyped_storage().data_ptr()
        where = "new" if address in self.made else (address, x.storage_offset())
        return where, tuple(x.shape), x.stride(), x.dtype

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = tree_flatten((args, kwargs or {}))[0]
        record = (str(func), [self.name(x) for x in inputs])
        out = func(*args, **(kwargs or {}))
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        used = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor)}
        self.made |= {o.untyped_storage().data_ptr() for o in outputs} - used  # in-place results are not new
        self.ops.append(record + ([(tuple(o.shape), o.dtype) for o in outputs],))
        return out


def test_every_step_is_the_same_graph(tiny, monkeypatch):
    """What makes the CUDA-graph replay of run() correct, checked on the CPU: every step of a generation
    runs the same kernels on the same shapes, reads state only from memory that stays in place (the cache,
    the drafts, the uniforms), takes no value from the host that changes between steps, and never reads
    a value back (a data-dependent shape or .item() would)."""
    steps, original = [], sample.run

    def recording_run(step, *args):
        inputs = []

        # as cuda_graph does: the step's inputs are copied into tensors that stay in place
        def recorded(*fresh):
            inputs[:] = inputs or [x.clone() for x in fresh]
            for x, f in zip(inputs, fresh):
                x.copy_(f)
            with Recorder() as recorder:
                result = step(*inputs)
            steps.append(recorder.ops)
            return result
        return original(recorded, *args)

    monkeypatch.setattr(sample, "run", recording_run)
    drafter = GPT(replace(tiny.config, n_layer=1)).double().eval()
    prompts = PROMPTS
    for decode in (lambda g: generate_ar(tiny, prompts, 12, temperature=1.0, generator=g),
                   lambda g: generate_tidar(tiny, prompts, 12, draft_len=3, generator=g),
                   lambda g: generate_tidar(tiny, prompts, 12, draft_len=3, temperature=1.0, top_k=4,
                                            generator=g),
                   lambda g: generate_tidar(tiny, prompts, 12, draft_len=2, beta=0.5, rule="paper",
                                            generator=g),
                   lambda g: generate_speculative(tiny, drafter, prompts, 12, draft_len=3, temperature=0.9,
                                                  generator=g)):
        steps.clear()
        decode(torch.Generator().manual_seed(0))
        assert len(steps) >= 3
        sync = [op for op, *_ in steps[0] if any(name in op for name in ("_local_scalar_dense", "nonzero",
                                                                           "lift_fresh"))]
        assert sync == []  # a read of a value, a shape that depends on one, or a tensor made from host data
        assert all(s == steps[0] for s in steps[1:])


class CPUGraph(TorchDispatchMode):
    """
    A CUDA graph's contract, kept on the CPU. Recording writes down every kernel with the very tensors it
    reads and writes, and leaves every tensor as it was (a capture launches nothing); a replay runs those
    kernels again on those tensors. Views compute nothing and keep pointing where they pointed.
    """

    def __init__(self, recorded):
        super().__init__()
        self.kernels, self.replays = [], 0
        recorded.append(self)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bound = {a.name: v for a, v in zip(func._schema.arguments, args)} | kwargs
        written = [bound[a.name] for a in func._schema.arguments if a.alias_info is not None
                   and a.alias_info.is_write and isinstance(bound.get(a.name), torch.Tensor)]
        before = [w.clone() for w in written]
        out = func(*args, **kwargs)
        for w, b in zip(written, before):
            w.copy_(b)
        self.kernels.append((func, args, kwargs, out))
        return out

    def replay(self):
        self.replays += 1
        for func, args, kwargs, out in self.kernels:
            alias = func._schema.returns[0].alias_info if func._schema.returns else None
            if alias is None:  # a new tensor: computed again into the one recorded
                for o, r in zip(tree_flatten(out)[0], tree_flatten(func(*args, **kwargs))[0]):
                    o.copy_(r)
            elif alias.is_write:  # in place: done again
                func(*args, **kwargs)


@pytest.fixture
def cpu_graphs(monkeypatch):
    """sample.cuda_graph running on the CPU, on CPUGraph: a decoder called with capture=True replays its
    steps. Returns the list of the graphs recorded, in order."""
    stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    recorded = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: CPUGraph(recorded))
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: graph)
    run = sample.run
    # run's last argument is capture
    monkeypatch.setattr(sample, "run", lambda step, *args: run(sample.cuda_graph(step) if args[-1] else step,
                                                               *args))
    return recorded


def replays_equal_eager(model, graphs=None):
    """
    Recording a generation's step once and replaying it gives what eager steps give, for every decoder and
    rule, greedy and sampling. With graphs (the emulated ones): each generation records exactly one graph of
    its own and replays it at every later step.
    """
    device = next(model.parameters()).device
    drafter = GPT(replace(model.config, n_layer=1)).double().to(device).eval()
    decoders = [lambda p, **kw: generate_ar(model, p, 12, **kw),
                lambda p, **kw: generate_ar(model, p, 12, temperature=1.0, **kw),
                lambda p, **kw: generate_tidar(model, p, 12, draft_len=3, **kw),
                lambda p, **kw: generate_tidar(model, p, 12, draft_len=3, temperature=1.0, top_k=4, **kw),
                lambda p, **kw: generate_tidar(model, p, 12, draft_len=3, temperature=0.7, top_k=4, **kw),
                lambda p, **kw: generate_tidar(model, p, 12, draft_len=2, beta=0.5, rule="paper", **kw),
                lambda p, **kw: generate_speculative(model, drafter, p, 12, draft_len=3, temperature=0.9,
                                                     **kw)]
    for prompts in (PROMPTS, [[7, 7], [9, 3, 1], [2, 2, 2, 2, 2, 8, 5]]):
        for decode in decoders:
            eager = decode(prompts, capture=False, generator=torch.Generator(device).manual_seed(0))
            before = len(graphs or [])
            captured = decode(prompts, capture=True, generator=torch.Generator(device).manual_seed(0))
            assert captured == eager
            if graphs is not None:
                assert len(graphs) == before + 1 and graphs[-1].replays >= 2
    with torch.inference_mode():  # a generation inside inference mode records and replays its own graph too
        assert decoders[2](PROMPTS, capture=True) == decoders[2](PROMPTS, capture=False)


def test_replayed_steps_equal_eager_steps(tiny, cpu_graphs):
    replays_equal_eager(tiny, cpu_graphs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the captured step exists only on CUDA")
def test_cuda_replays_equal_eager_steps(tiny):
    """On a GPU (CI has none): the same with real CUDA graphs, bit for bit."""
    replays_equal_eager(tiny.cuda())


# --- bad requests


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(draft_len=0), "draft_len must be at least 1"),
        (dict(temperature=-1.0), "temperature must be a number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a number >= 0"),
        (dict(rule="authors"), "rule must be 'lossless' or 'paper'"),
        (dict(top_k=0, temperature=1.0), "top_k must be at least 1"),
        (dict(beta=1.5), r"beta must lie in \[0, 1\]"),
        (dict(max_new_tokens=40), "exceeds the model's context of 48"),
        (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (dict(prompt_ids=[1, 11]), r"prompt token ids must be ints in \[0, 11\)"),  # 11 is [MASK]
        (dict(prompt_ids=[[1, 2], [3, -1]]), r"prompt token ids must be ints in \[0, 11\)"),
        # the longest row counts
        (dict(prompt_ids=[[1], [2] * 20], max_new_tokens=21), "prompt \\(20 tokens\\)"),
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
    """sample.py as a user starts it, in an interpreter of its own (the other CLI tests fork pytest)."""
    write_checkpoint(tmp_path)
    (tmp_path / "prompt.txt").write_text("def fibonacci(n):\n")
    args = ["--out_dir", str(tmp_path), "--prompt", f"FILE:{tmp_path / 'prompt.txt'}"]
    run = subprocess.run([sys.executable, "sample.py", *args, "--max_new_tokens", "20", "--compare", "--show",
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("step   1 | ") == 1 and "{+" in run.stdout  # --show, plain text when piped
    assert "def fibonacci(n):\n" in run.stdout
    assert "--- TiDAR: 20 new tokens" in run.stdout and "tokens/forward" in run.stdout
    assert "outputs identical: True" in run.stdout


def test_cli_default_length_fits_the_context(tmp_path):
    # 256 new tokens, or what the model's context leaves: 96 - 9 (the prompt) - 2 * 4 (the drafts' room) = 79
    write_checkpoint(tmp_path)
    run = run_script("sample.py", "--out_dir", str(tmp_path), "--device", "cpu", "--prompt", "def f(x):")
    assert run.returncode == 0, run.stderr
    assert "--- TiDAR: 79 new tokens" in run.stdout


def test_cli_eager_turns_the_cuda_graph_off(tmp_path, monkeypatch):
    write_checkpoint(tmp_path)
    seen = []  # the capture argument of every decoder call (the warm-ups, TiDAR, AR)
    for name in ("generate_tidar", "generate_ar"):
        real = getattr(sample, name)
        spy = lambda *a, _real=real, **kw: seen.append(kw["capture"]) or _real(*a, **kw)
        monkeypatch.setattr(sample, name, spy)
    for flags, capture in (([], True), (["--eager"], False)):
        seen.clear()
        sample.main(sample.parser.parse_args(["--out_dir", str(tmp_path), "--device", "cpu", "--prompt", "x",
                                              "--max_new_tokens", "4", "--compare", *flags]))
        assert len(seen) == 4 and set(seen) == {capture}


def test_cli_replayed_equals_eager(tmp_path, cpu_graphs, capsys):
    """sample.py as a user runs it, with its steps replayed from (emulated) CUDA graphs: several samples,
    batches of prompts of different lengths, sampling and --compare print what eager decoding prints."""
    write_checkpoint(tmp_path)
    (tmp_path / "prompts.txt").write_text("def f(x):\n<|endoftext|>\nimport os\n<|endoftext|>\nclass A:\n")
    printed = []
    for flags in ([], ["--eager"]):
        sample.main(sample.parser.parse_args(["--out_dir", str(tmp_path), "--device", "cpu", "--prompt",
                                              f"FILE:{tmp_path / 'prompts.txt'}", "--batch_size", "2",
                                              "--num_samples", "2", "--temperature", "0.8",
                                              "--max_new_tokens", "12", "--compare", "--show", *flags]))
        printed.append(re.sub(r"[\d.]+ ?(s|tokens/s|x)\b", "", capsys.readouterr().out))  # not the timings
    assert printed[0] == printed[1] and printed[0].count("--- AR:") == 4
    # one graph per generation: 2 warm-ups, then 2 samples x 2 batches x 2 decoders
    assert len(cpu_graphs) == 10


def test_cli_batches(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "prompts.txt").write_text("def f(x):\n<|endoftext|>\nimport os\n<|endoftext|>\nclass A:\n")
    args = ["sample.py", "--out_dir", str(tmp_path), "--device", "cpu", "--max_new_tokens", "12"]
    # three prompts from a file, two at a time: two batches, greedy, AR beside them
    run = run_script(*args, "--prompt", f"FILE:{tmp_path / 'prompts.txt'}", "--batch_size", "2", "--compare")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.count("--- TiDAR: 12 new tokens") == 3 and "batch of 2" in out and "batch of 1" in out
    assert out.count("outputs identical: True") == 2
    assert out.index("def f(x):\n") < out.index("import os\n") < out.index("class A:\n")
    # four samples of one prompt in one batch, and the paper's rule in bfloat16
    run = run_script(*args, "--prompt", "x = ", "--batch_size", "4", "--temperature", "1", "--rule", "paper",
                     "--beta", "0", "--dtype", "bfloat16")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("--- TiDAR: 12 new tokens") == 4 and "TiDAR (paper)" in run.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--draft_len", "0"], "draft_len must be at least 1"),
        (["--temperature", "-0.5"], "temperature must be a number >= 0"),
        (["--temperature", "nan"], "temperature must be a number >= 0"),
        (["--batch_size", "0"], "--batch_size must be at least 1"),
        (["--top_k", "0", "--temperature", "1"], "top_k must be at least 1"),
        (["--beta", "2"], "beta must lie in"),
        (["--max_new_tokens", "90"], "exceeds the model's context of 96"),
        (["--prompt", "FILE:/nonexistent/prompt.txt"], "cannot read prompt file"),
        (["--num_samples", "0"], "--num_samples must be at least 1"),
        (["--device", "tpu"], "--device=tpu is not available here"),
        (["--temperature", "1e-45"],
         "temperature 1e-45 is too small to divide by in float32: use 0 for greedy"),
        (["--draft_len", "300"],
         "room for the drafts (600) = 602 exceeds the model's context of 96: use a smaller draft_len: its "
         "room alone fills the context"),
        (["--draft_len", "40", "--prompt", "x" * 20],
         "shorten the prompt to 15 tokens or fewer, or use a smaller draft_len"),
        (["--max_new_tokens", "0"], "max_new_tokens must be at least 1"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, args, message):
    write_checkpoint(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main(sample.parser.parse_args(["--out_dir", str(tmp_path), "--device", "cpu", "--prompt", "x",
                                              *args]))
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
    (tmp_path / "junk" / "ckpt.pt").write_bytes(bytes(range(256)) * 4)
    # not torch's advice to load it unsafely
    assert error(tmp_path / "junk").endswith(
        f"cannot load {tmp_path / 'junk' / 'ckpt.pt'} (UnpicklingError): it is damaged, or not a checkpoint "
        "of this version's train.py; retrain, or pick another --out_dir\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "ckpt.pt").write_bytes(b"")  # a 0-byte file: an exception with no message
    assert "cannot load" in error(tmp_path / "empty")


def test_cli_ctrl_c_is_one_line(tmp_path):
    write_checkpoint(tmp_path)
    prelude = "import tidar\ndef stop(*a, **k): raise KeyboardInterrupt\ntidar.GPT.forward = stop"
    run = run_script("sample.py", "--out_dir", str(tmp_path), "--device", "cpu", "--prompt", "x",
                     prelude=prelude)
    assert run.stderr == "sample.py: interrupted\n" and run.returncode == -signal.SIGINT


def test_cli_prompt_file_not_utf8(tmp_path, capsys):
    write_checkpoint(tmp_path)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(SystemExit) as e:
        sample.main(sample.parser.parse_args(["--out_dir", str(tmp_path), "--device", "cpu",
                                              "--prompt", f"FILE:{tmp_path / 'latin1.txt'}"]))
    err = capsys.readouterr().err
    assert e.value.code != 0 and "is not UTF-8 text" in err and err.count("\n") == 1
