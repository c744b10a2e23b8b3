"""The model side, as a specification: the masks against slow loops, no leakage, the clean half is a plain AR
model, cached = uncached, exact rollback (by hand), the loss, and every attention backend honouring its
mask."""
import math
import warnings
from dataclasses import replace

import pytest
import torch

from conftest import run_script
from tidar import (
    GPT,
    GPTConfig,
    KVCache,
    SelfAttention,
    additive_mask,
    apply_rope,
    causal_allowed,
    flex_mask,
    training_allowed,
    ar_inputs,
    causal_mask,
    decode_step_mask,
    decode_step_positions,
    place_step_mask,
    prefill_mask,
    tidar_inputs,
    tidar_loss,
    tidar_training_mask,
    training_loss,
)


# --- the masks, against slow loops written from the README's tables, not from tidar.py


def slow_training_mask(S, B):
    M = torch.zeros(2 * S, 2 * S, dtype=torch.bool)
    for i in range(2 * S):
        for j in range(2 * S):
            if i < S and j < S:
                M[i, j] = j <= i
            elif i >= S and j < S:
                M[i, j] = j < ((i - S) // B) * B
            elif i >= S and j >= S:
                M[i, j] = (i - S) // B == (j - S) // B
    return M


def slow_decode_step_mask(L, k):
    T = k + k * k
    M = torch.zeros(T, L + T, dtype=torch.bool)
    for q in range(T):
        M[q, :L] = True
        if q < k:  # d_q: causal over the d tokens
            M[q, L : L + q + 1] = True
        else:  # block b, rows k + (b-1)k .. : sees d_0 .. d_{b-1} and its own block
            b = (q - k) // k + 1
            M[q, L : L + b] = True
            start = L + k + (b - 1) * k
            M[q, start : start + k] = True
    return M


@pytest.mark.parametrize("S,B", [(8, 4), (12, 3), (16, 16), (10, 4), (6, 1)])
def test_training_mask_matches_the_table(S, B):
    M = tidar_training_mask(S, B)
    assert M.dtype == torch.bool and M.shape == (2 * S, 2 * S)
    assert torch.equal(M, slow_training_mask(S, B))
    assert M.any(dim=1).all(), "a query row with no allowed key"


@pytest.mark.parametrize("L,k", [(0, 1), (2, 3), (5, 4), (1, 8)])
def test_decode_step_mask_matches_the_table(L, k):
    M = decode_step_mask(L, k)
    assert torch.equal(M, slow_decode_step_mask(L, k))
    assert M.any(dim=1).all()
    # the paper's trick: the (k + k*k) square never changes; the cache columns are all True
    assert torch.equal(M[:, L:], decode_step_mask(0, k)) and M[:, :L].all()


def test_per_row_masks_hide_every_slot_past_what_a_row_may_see():
    # A static cache: keys are buffer slots; a row with L committed tokens sees the same pattern as a fresh
    # cache of L, and no slot past its own step (stale drafts, another row's longer text) is visible.
    k, n_keys, L = 3, 40, torch.tensor([0, 5, 20])
    M = decode_step_mask(L, k, n_keys)
    assert M.shape == (3, k + k * k, n_keys)
    # the paper's trick: the same mask
    assert torch.equal(place_step_mask(decode_step_mask(0, k), L, n_keys), M)
    for b, l in enumerate(L.tolist()):
        own = decode_step_mask(l, k)
        assert torch.equal(M[b, :, : own.size(1)], own) and not M[b, :, own.size(1) :].any()
    C = causal_mask(2, L, n_keys)
    assert all(torch.equal(C[b], causal_mask(2, l, n_keys)) for b, l in enumerate(L.tolist()))
    assert not C[1, :, 7:].any()
    P, W = torch.tensor([2, 5]), 5 + k
    F_ = prefill_mask(P, k, W, n_keys)
    for b, p in enumerate(P.tolist()):
        assert torch.equal(F_[b, : p + k, : p + k], prefill_mask(p, k)) and not F_[b, : p + k, p + k :].any()
        # the padding rows have keys too (no NaN), and nobody sees them
        assert F_[b, p + k :].any(dim=1).all()
        assert not F_[b, : p + k, p + k : W].any()


def test_prefill_mask_and_positions():
    P, k = 5, 3
    M = prefill_mask(P, k)
    assert torch.equal(M[:P, :P], torch.ones(P, P, dtype=torch.bool).tril()) and not M[:P, P:].any()
    assert M[P:].all()  # the masks see the whole prompt and each other
    # block b's slot s sits at L + b + s: slot 0 of block b shares its position with d_b
    pos = decode_step_positions(10, 3).tolist()
    assert pos == [10, 11, 12, 11, 12, 13, 12, 13, 14, 13, 14, 15]
    assert decode_step_positions(torch.tensor([10, 0]), 3).tolist() == [pos, [p - 10 for p in pos]]


# --- no leakage; the clean half is a plain AR model


def doubled_logits(model, x):
    return model(*tidar_inputs(x, model.config.block_len, model.config.mask_id))


def test_no_leakage(tiny):
    S, B = 16, tiny.config.block_len
    x = torch.randint(0, 10, (1, S))
    base = doubled_logits(tiny, x)
    for t in range(S):
        x2 = x.clone()
        x2[0, t] = (x2[0, t] + 1) % 10
        out = doubled_logits(tiny, x2)
        assert torch.equal(out[:, :t], base[:, :t]), f"AR logits before {t} saw token {t}"
        assert not torch.allclose(out[:, t], base[:, t])  # the change is visible where it may be
        for b in range(S // B):
            rows = slice(S + b * B, S + (b + 1) * B)
            if t >= b * B:
                assert torch.equal(out[:, rows], base[:, rows]), f"mask block {b} saw clean token {t}"
            else:
                assert not torch.allclose(out[:, rows], base[:, rows])


def test_clean_half_is_plain_ar(tiny):
    x = torch.randint(0, 10, (3, 16))
    doubled = doubled_logits(tiny, x)
    plain = tiny(*ar_inputs(x))
    torch.testing.assert_close(doubled[:, :16], plain, rtol=0, atol=1e-12)


# --- cached = uncached; rollback is exact


def fresh_cache(model, tokens, extra=64):
    """A cache filled by one causal forward over `tokens`, the reference for what a cache must hold."""
    n = len(tokens)
    cache = KVCache(model.config, 1, n + extra, dtype=torch.float64)
    model(torch.tensor([tokens]), torch.arange(n), causal_mask(n, 0, cache.max_len), cache)
    cache.length.fill_(n)
    return cache


def decode_step(model, cache, d):
    k, L = len(d), cache.length
    idx = torch.tensor([d + [model.config.mask_id] * (k * k)])
    return model(idx, decode_step_positions(L, k), decode_step_mask(L, k, cache.max_len), cache)[0]


def test_cached_step_equals_uncached_forward(tiny):
    prompt, d = [1, 2, 3, 4, 5], [6, 7, 8, 9]
    cache = fresh_cache(tiny, prompt)
    logits = decode_step(tiny, cache, d)
    full = torch.tensor([prompt + d])
    uncached = tiny(full, torch.arange(9), causal_mask(9))[0]
    torch.testing.assert_close(logits[: len(d)], uncached[len(prompt) :], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [0, 2, 3])  # accepted drafts: zero, partial, full (k - 1)
def test_rollback_is_exact(tiny, n):
    prompt, d, k = [1, 2, 3, 4, 5], [6, 7, 8, 9], 4
    cache = fresh_cache(tiny, prompt)
    decode_step(tiny, cache, d)  # writes d_0 .. d_3 and all 16 masks past the committed length
    cache.length.fill_(len(prompt) + n + 1)  # commit d_0 .. d_n: one assignment
    committed = prompt + d[: n + 1]
    ref = fresh_cache(tiny, committed)
    L = len(committed)
    assert cache.length.item() == ref.length.item() == L
    torch.testing.assert_close(cache.keys[:, :, :, :L], ref.keys[:, :, :, :L], rtol=0, atol=1e-12)
    torch.testing.assert_close(cache.values[:, :, :, :L], ref.values[:, :, :, :L], rtol=0, atol=1e-12)
    # scratch entries are there (drafts, or the [MASK] K/V left in the buffer) ...
    assert not torch.equal(cache.keys[:, :, :, L : L + 4], ref.keys[:, :, :, L : L + 4])
    # ... and the next step sees nothing of what was rolled back
    nxt = [3, 1, 4, 1]
    torch.testing.assert_close(decode_step(tiny, cache, nxt), decode_step(tiny, ref, nxt), rtol=0, atol=1e-12)


# --- the loss


def test_loss_on_a_hand_computable_case():
    # V = 2, S = 1: logits [0, log 3] give p = (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0]]])  # (1, 2S, V)
    x, y = torch.tensor([[1]]), torch.tensor([[0]])
    loss, ar, diff = tidar_loss(logits, x, y, alpha=0.5)
    # AR: clean position 0 predicts y_0 = 0 with p = 1/4; diffusion: the mask predicts x_0 = 1 with p = 1/4
    assert ar.item() == pytest.approx(math.log(4))
    assert diff.item() == pytest.approx(math.log(4))
    _, ar, diff = tidar_loss(logits, torch.tensor([[0]]), torch.tensor([[1]]), alpha=0.5)
    assert ar.item() == pytest.approx(math.log(4 / 3)) and diff.item() == pytest.approx(math.log(4 / 3))
    loss, ar, diff = tidar_loss(logits, torch.tensor([[0]]), torch.tensor([[0]]), alpha=0.5)
    assert loss.item() == pytest.approx((0.5 * math.log(4) + math.log(4 / 3)) / 1.5)


def test_gradients_reach_both_halves(tiny):
    x = torch.randint(0, 10, (2, 17))
    x, y = x[:, :-1], x[:, 1:]
    idx, pos, mask = tidar_inputs(x, tiny.config.block_len, tiny.config.mask_id)
    logits = tiny(idx, pos, mask)
    logits.retain_grad()
    loss, ar, diff = tidar_loss(logits, x, y)
    loss.backward()
    assert logits.grad[:, :16].abs().sum() > 0 and logits.grad[:, 16:].abs().sum() > 0
    assert tiny.wte.weight.grad[tiny.config.mask_id].abs().sum() > 0  # the [MASK] embedding learns
    assert loss.item() == pytest.approx((ar.item() + diff.item()) / 2)


# --- the mask is really used


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("as_given", ["bool", "additive"])  # additive: as GPT.forward hands it to every layer
def test_attention_honours_the_bool_mask(per_row, as_given):
    torch.manual_seed(1)
    config = GPTConfig(n_embd=16, n_head=2, seq_len=16)
    attn = SelfAttention(config, 0).double()
    N, T, C, nh = 2, 7, 16, 2
    x = torch.randn(N, T, C, dtype=torch.float64)
    mask = torch.rand(N if per_row else 1, T, T) < 0.5
    mask[:, torch.arange(T), torch.randint(0, T, (T,))] = True  # no empty row
    mask = mask[:, None] if per_row else mask[0]  # (N, 1, T, T) as GPT.forward passes it, or (T, T)
    cos, sin = torch.randn(T, 8, dtype=torch.float64), torch.randn(T, 8, dtype=torch.float64)
    out = attn(x, cos, sin, mask if as_given == "bool" else additive_mask(mask, torch.float64))
    # the same computation by hand
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(N, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(C // nh)
    att = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    ref = attn.c_proj((att @ v).transpose(1, 2).reshape(N, T, C))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert not torch.allclose(out, attn(x, cos, sin, torch.ones(T, T, dtype=torch.bool).tril()))


def test_flex_attention_block_masks_give_the_dense_logits(tiny):
    # On CUDA under torch.compile, training attends through FlexAttention block masks built from the same
    # patterns; on the CPU FlexAttention runs forward only (unfused), enough to check it computes the same.
    x, B, m = torch.randint(0, 10, (2, 16)), tiny.config.block_len, tiny.config.mask_id
    with warnings.catch_warnings(), torch.no_grad():  # no backward on the CPU
        warnings.simplefilter("ignore")  # "called without torch.compile": expected here
        pairs = [(tidar_inputs(x, B, m, flex=True), tidar_inputs(x, B, m)),
                 (ar_inputs(x, True), ar_inputs(x))]
        for flex, dense in pairs:
            assert dense[2].dtype == torch.bool and not isinstance(flex[2], torch.Tensor)
            torch.testing.assert_close(tiny(*flex), tiny(*dense), rtol=0, atol=1e-10)
        other = flex_mask(training_allowed, 32, torch.device("cpu"), S=16, B=B + 4)  # another block length
        idx, pos, _ = tidar_inputs(x, B, m)
        assert not torch.allclose(tiny(*tidar_inputs(x, B, m, flex=True)), tiny(idx, pos, other))
        assert flex_mask(causal_allowed, 16, torch.device("cpu")) is ar_inputs(x, True)[2]  # built once


def test_positions_are_relative(tiny):
    """Rotary positions, the README's choice: shifting every position id by the same amount leaves the logits
    as they were, so a block of masks sees the same picture wherever it starts (training: at multiples of B;
    decoding: anywhere)."""
    idx, mask = torch.randint(0, 10, (2, 12)), prefill_mask(8, 4)
    logits = [tiny(idx, torch.arange(12) + shift, mask) for shift in (0, 5, 29)]
    for shifted in logits[1:]:
        torch.testing.assert_close(shifted, logits[0], rtol=0, atol=1e-10)
    # the order of positions counts
    assert not torch.allclose(tiny(idx, torch.arange(12).flip(0), mask), logits[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's attention kernels exist only on CUDA")
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_attention_honours_the_decode_mask(dtype, atol):
    """On a GPU (CI has none): whatever kernel SDPA picks there for a decode step (a per-row mask over a
    static cache, made additive as GPT.forward does; float32 or bfloat16) attends as the CPU's float64 path
    does, and scratch slots full of garbage stay hidden, as they must when a kernel would rather ignore the
    mask."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=128, seq_len=64)
    attn, N, k, C = SelfAttention(config, 0).double(), 2, 4, 128
    T, L = k + k * k, torch.tensor([5, 17])
    cache = KVCache(config, N, 48, dtype=torch.float64)
    cache.keys.normal_(), cache.values.normal_()
    for i in range(N):  # past the committed rows and this step's own: never to be seen
        cache.keys[:, i, :, L[i] + T :], cache.values[:, i, :, L[i] + T :] = 100.0, 100.0
    x, cos, sin = torch.randn(N, T, C, dtype=torch.float64), torch.randn(T, 64), torch.randn(T, 64)
    mask = decode_step_mask(L, k, cache.max_len)[:, None]  # (N, 1, T, n_keys)

    def attend(device, dtype):
        c = KVCache(config, N, 48, device, dtype)
        c.keys.copy_(cache.keys), c.values.copy_(cache.values), c.length.copy_(L)
        to = lambda t: t.to(device, dtype)
        out = attn.to(device, dtype)(to(x), to(cos), to(sin), additive_mask(mask.to(device), dtype), c)
        return out.double().cpu()

    ref = attend("cpu", torch.float64)
    torch.testing.assert_close(attend("cuda", dtype), ref, rtol=0, atol=atol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention runs only on CUDA")
def test_cuda_compiled_flex_training_equals_dense():
    """On a GPU (CI has none): a training step as train.py runs it there, compiled with FlexAttention block
    masks, gives the loss and the gradients of the dense-mask path, for both objectives."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=11, eot_id=10, seq_len=128, block_len=16, n_layer=2, n_head=2, n_embd=64)
    model = GPT(config).cuda()
    with torch.no_grad():  # sharper attention than at initialisation, so that a wrong mask shows in the loss
        for layer in model.layers:
            layer.attn.c_attn.weight.mul_(10)
    data = torch.randint(0, 10, (2, config.seq_len + 1), device="cuda")
    x, y = data[:, :-1], data[:, 1:]
    compiled = torch.compile(model, dynamic=False)

    def loss_and_grads(forward, objective, flex, block_len=config.block_len):
        loss = training_loss(forward, replace(config, block_len=block_len), x, y, objective, flex=flex)[0]
        return [loss, *torch.autograd.grad(loss, list(model.parameters()))]

    for objective in ("ar", "tidar"):
        dense, flex = loss_and_grads(model, objective, False), loss_and_grads(compiled, objective, True)
        for d, f in zip(dense, flex):
            torch.testing.assert_close(f, d, rtol=1e-3, atol=1e-4)
    wrong = loss_and_grads(model, "tidar", False, block_len=8)  # this tolerance tells another mask apart
    assert not all(torch.allclose(w, d, rtol=1e-3, atol=1e-4) for w, d in zip(wrong, dense))


def test_forward_refuses_a_missing_or_wrong_mask(tiny):
    x = torch.randint(0, 10, (1, 6))
    pos = torch.arange(6)
    for bad in [None, torch.zeros(6, 6), torch.ones(6, 5, dtype=torch.bool)]:
        with pytest.raises(ValueError, match="bool mask"):
            tiny(x, pos, bad)


def test_python_tidar_draws_both_masks():
    run = run_script("tidar.py")
    assert run.returncode == 0, run.stderr
    training, step = run.stdout.split("decode-step mask")
    cells = lambda text: sum(line.count("#") for line in text.splitlines() if "|" in line)  # grid rows only
    assert "training mask, S=8, B=4" in training and cells(training) == int(slow_training_mask(8, 4).sum())
    assert cells(step) == int(decode_step_mask(2, 3).sum())
