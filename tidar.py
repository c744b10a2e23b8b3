"""
TiDAR, the model side: "Think in Diffusion, Talk in Autoregression" (J. Liu et al., arXiv 2511.08923).

One GPT, one set of weights, one output head, run in two modes that differ only in the attention
pattern and in what the input tokens are (README, "TiDAR in a few paragraphs"):
  - AR mode ("talk"): clean tokens, causal attention, the output at position i predicts token i+1.
  - diffusion mode ("think"): [MASK] tokens, bidirectional inside a block of masks that also sees the
    clean tokens before the block; the output at a mask at position i predicts the token *at* i.

This file holds everything the two modes share:
  1. the GPT (config, rotary positions, attention with an explicit mask, layers)
  2. the attention patterns, as pure functions of (query index, key index) -> may attend
  3. the training objective: the doubled sequence and the mixed AR + diffusion loss
  4. the KV cache: static, with a per-row committed length that makes rollback one assignment
`python tidar.py` draws the training mask and a decode-step mask. The decode loop is in sample.py.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# -----------------------------------------------------------------------------
# 1. The GPT


@dataclass
class GPTConfig:
    vocab_size: int = 257  # the byte tokenizer's; train.py reads the dataset's (261 for code); [MASK]: +1
    eot_id: int = 256  # <|endoftext|>: decoding stops there
    seq_len: int = 1024  # S, the context: training length of the clean half, and the largest position + 1
    block_len: int = 16  # B, the mask block length used in training; the default draft length k
    n_layer: int = 8  # the defaults are train.py's default model on a GPU
    n_head: int = 8
    n_embd: int = 512
    rope_base: float = 10000.0

    @property
    def mask_id(self):
        return self.vocab_size  # an extra embedding row that no tokenizer emits


def rope_tables(seq_len, head_dim, base):
    """cos and sin of the rotary angles, (seq_len, head_dim), indexed by position id: hs/2 angles, twice."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq).repeat(1, 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    # Rotary positions (choice; README, "Training: the doubled sequence"): attention scores depend only on
    # the distance between positions, so a mask at offset r of its block sees the same picture whether the
    # block starts at a multiple of B (training) or anywhere (decoding). Position ids are explicit because
    # the masks of the doubled sequence repeat the positions of the clean half.
    # Each pair (x1_i, x2_i) turns by its angle: (x1 cos - x2 sin, x2 cos + x1 sin).
    x1, x2 = x.chunk(2, dim=-1)  # (..., T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, hs), or (N, 1, T, hs) with a position per row
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def additive_mask(mask, dtype):
    """A bool mask (True = may attend) as attention kernels add it to the scores: 0, or -inf (never seen)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class SelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.layer_idx = config.n_head, layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        N, T, C = x.size()  # N rows (the batch), T tokens, C channels
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (N, nh, T, hs) each
        q, k, v = (t.view(N, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(torch.stack([q, k]), cos, sin)  # together: half the kernels to launch
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v)  # (N, nh, max_len, hs): the whole buffer
        # The mask is the whole of TiDAR's "two modes in one forward": added to the scores (0, or -inf where a
        # query may not attend; GPT.forward makes it from the bool pattern), or a FlexAttention BlockMask.
        if isinstance(mask, BlockMask):  # training on CUDA: the same pattern, all-False tiles skipped
            y = flex_attention(q, k, v, block_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(N, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Layer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = SelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.ln_1(x), cos, sin, mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size + 1, config.n_embd)  # +1: the [MASK] row
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # never predicts [MASK]
        cos, sin = rope_tables(config.seq_len, config.n_embd // config.n_head, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():  # GPT-2 init, residual projections scaled by depth
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, pos, mask, cache=None):
        """
        idx (N, T) token ids; pos (T,) or (N, T) position ids; mask (T, n_keys) or (N, T, n_keys) bool, True =
        may attend, or a FlexAttention BlockMask. Without a cache the keys are this forward's T tokens. With
        one, every token's K/V is written to the cache, at its row's entries length .. length + T - 1, and the
        keys are the whole buffer (n_keys = cache.max_len): the mask hides what is not committed, and setting
        cache.length afterwards decides what is kept. Returns logits (N, T, vocab_size).
        """
        T, n_keys = idx.size(1), cache.max_len if cache is not None else idx.size(1)
        dense = mask is not None and not isinstance(mask, BlockMask)
        if mask is None or dense and (mask.dtype != torch.bool or tuple(mask.shape[-2:]) != (T, n_keys)):
            # No silent fallback to causal attention: without its mask this is not TiDAR.
            got = None if mask is None else (mask.dtype, tuple(mask.shape))
            raise ValueError(f"attention needs a bool mask of shape (..., {T}, {n_keys}), got {got}")
        x = self.wte(idx)  # (N, T, C)
        if dense:  # made additive once here, rather than by SDPA in every layer
            mask = additive_mask(mask, x.dtype).unsqueeze(-3)  # (1 or N, 1, T, n_keys): one for every head
        cos, sin = self.rope_cos[pos].unsqueeze(-3), self.rope_sin[pos].unsqueeze(-3)  # (1 or N, 1, T, hs)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.lm_head(self.ln_f(x))  # (N, T, vocab_size)


# -----------------------------------------------------------------------------
# 2. Attention patterns. Each is a pure function of (query index i, key index j) -> may attend, written
# with comparisons and & | only, so it works on Python ints (the tests' slow loops), on broadcast index
# tensors, and as a FlexAttention mask function alike. Lengths (L, P) may be one per row. The *_mask
# functions turn them into (queries, keys) bool tensors, (N, queries, keys) for per-row lengths;
# place_step_mask places a decode step's own part after each row's cache (the paper's mask trick).
# Keys are the cache's entries when there is a cache: the committed tokens at 0 .. L-1, then this forward's
# own tokens at L .. L+T-1; any entry past what a pattern names is hidden.


def causal_allowed(i, j, L=0):
    """Plain AR: query i (after L cached tokens) sees every key up to and including itself."""
    return j <= L + i


def training_allowed(i, j, S, B):
    """The doubled sequence [x_0 .. x_{S-1}, m .. m] (the paper's Figure 3, training); a mask at position i
    is in block (i - S) // B."""
    clean_i, clean_j = i < S, j < S
    block_i, block_j = (i - S) // B, (j - S) // B
    return (
        (clean_i & clean_j & (j <= i))  # clean -> clean: causal
        | ((i >= S) & clean_j & (j < block_i * B))  # mask -> clean: strictly before its block
        | ((i >= S) & (j >= S) & (block_i == block_j))  # mask -> mask: own block, both ways
    )  # clean -> mask: never


def prefill_allowed(i, j, P, k):
    """
    The prompt p_0 .. p_{P-1} (causal), then one block of k masks that sees the whole prompt and itself.
    In a batch the rows are padded with more masks to the longest; those see the same, and nobody sees them.
    """
    return ((i < P) & (j <= i)) | ((i >= P) & (j < P + k))


def decode_step_allowed(i, j, L, k):
    """
    One decode step (the paper's Figure 2; README, "Decoding: one forward per step"): L cached tokens, then
    k + k*k queries: d_0 .. d_{k-1} (causal), then blocks 1 .. k of k masks; block b sees the cache,
    d_0 .. d_{b-1} and itself.
    """
    jn = j - L  # key index among this step's tokens (negative: a cached token)
    block_i, block_j = (i - k) // k + 1, (jn - k) // k + 1  # 0 for the d tokens, b for block b
    return (
        (jn < 0)  # everyone sees the whole cache
        | ((i < k) & (jn >= 0) & (jn <= i))  # d_a sees d_0 .. d_a
        | ((i >= k) & (jn >= 0) & (jn < block_i))  # block b sees d_0 .. d_{b-1}
        | ((i >= k) & (jn >= k) & (block_i == block_j))  # and its own block, both ways; no other block
    )


def _mask(allowed, n_query, n_key, device=None, **lengths):
    i = torch.arange(n_query, device=device)[:, None]
    j = torch.arange(n_key, device=device)[None, :]
    # a length per row, (N,), broadcast as (N, 1, 1)
    lengths = {name: v[:, None, None] if torch.is_tensor(v) else v for name, v in lengths.items()}
    return allowed(i, j, **lengths)  # (n_query, n_key), or (N, n_query, n_key)


def causal_mask(T, L=0, n_keys=None, device=None):
    return _mask(causal_allowed, T, n_keys or L + T, device, L=L)


def tidar_training_mask(seq_len, block_len, device=None):
    """
    (2S, 2S) bool, True = may attend. For S=4, B=2 (x clean, m mask; rows are queries):
            x0 x1 x2 x3  m0 m1 m2 m3
        x0   #  .  .  .   .  .  .  .
        x1   #  #  .  .   .  .  .  .
        x2   #  #  #  .   .  .  .  .
        x3   #  #  #  #   .  .  .  .
        m0   .  .  .  .   #  #  .  .     block 0 sees no clean token
        m1   .  .  .  .   #  #  .  .
        m2   #  #  .  .   .  .  #  #     block 1 sees x0 x1, not x2 x3 (its own labels)
        m3   #  #  .  .   .  .  #  #
    """
    return _mask(training_allowed, 2 * seq_len, 2 * seq_len, device, S=seq_len, B=block_len)


@functools.lru_cache(maxsize=8)
def flex_mask(allowed, T, device, **lengths):
    """A (T, T) pattern as a FlexAttention BlockMask, built once: its all-False tiles are never computed."""
    return create_block_mask(lambda b, h, i, j: allowed(i, j, **lengths), None, None, T, T, device=device)


def prefill_mask(P, k, n_query=None, n_keys=None, device=None):
    n_query = n_query or P + k
    return _mask(prefill_allowed, n_query, n_keys or n_query, device, P=P, k=k)


def decode_step_mask(L, k, n_keys=None, device=None):
    """
    (k + k*k, L + k + k*k) bool. For L=1, k=2 (c cache, d drafts, bb mask block b; labels are positions):
              c | d   | b1  | b2
              0 | 1 2 | 2 3 | 3 4
        d 1   # | # . | . . | . .
        d 2   # | # # | . . | . .
        b1 2  # | # . | # # | . .      block 1 bets on "d_0 committed", block 2 on "d_0 d_1 committed"
        b1 3  # | # . | # # | . .
        b2 3  # | # # | . . | # #
        b2 4  # | # # | . . | # #
    """
    T = k + k * k
    return _mask(decode_step_allowed, T, n_keys or L + T, device, L=L, k=k)


def place_step_mask(own, L, n_keys):
    """
    The paper's mask trick, for a static cache. Every step has the same k + k*k queries, so the part of its
    mask among its own tokens, own = decode_step_mask(0, k), never changes: built once, it is placed after
    each row's L cache columns (all visible), at entries L .. L+T-1, and every later entry is hidden.
    own (T, T), L (N,) -> (N, T, n_keys), equal to decode_step_mask(L, k, n_keys) in a few kernels.
    """
    T = own.size(0)
    jn = torch.arange(n_keys, device=own.device) - L[:, None]  # (N, n_keys): an entry's index in the step
    placed = own[:, jn.clamp(0, T - 1)].transpose(0, 1)  # (N, T, n_keys): own's column jn, for 0 <= jn < T
    return (jn < 0)[:, None, :] | (placed & (jn < T)[:, None, :])


def decode_step_positions(L, k, device=None):
    """Position ids of one decode step: d_a at L + a, block b's slot s at L + b + s (just after d_{b-1})."""
    a = torch.arange(k, device=device)
    blocks = torch.arange(1, k + 1, device=device)[:, None] + a[None, :]  # (k, k)
    # (k + k*k,), or (N, k + k*k) for a length per row
    return torch.as_tensor(L, device=device)[..., None] + torch.cat([a, blocks.flatten()])


# -----------------------------------------------------------------------------
# 3. Training: one forward over the doubled sequence trains both modes (README, "Training: the doubled
# sequence")


def tidar_inputs(x, block_len, mask_id, flex=False):
    """
    Clean tokens x (N, S) -> the doubled sequence: idx (N, 2S), pos (2S,), mask (2S, 2S) bool; with flex, the
    same pattern as a FlexAttention BlockMask, which skips the three quarters of the mask that are False
    (train.py sets it on CUDA under torch.compile: FlexAttention is fused only when compiled, and it has no
    backward on the CPU).
    """
    S = x.size(1)
    idx = torch.cat([x, torch.full_like(x, mask_id)], dim=1)  # [x_0 .. x_{S-1}, m .. m]
    pos = torch.arange(S, device=x.device).repeat(2)  # the masks repeat positions 0 .. S-1
    if flex:
        return idx, pos, flex_mask(training_allowed, 2 * S, x.device, S=S, B=block_len)
    return idx, pos, tidar_training_mask(S, block_len, device=x.device)


def ar_inputs(x, flex=False):
    """The plain AR baseline: the clean half alone, causal (through the same attention backend as TiDAR's)."""
    S = x.size(1)
    mask = flex_mask(causal_allowed, S, x.device) if flex else causal_mask(S, device=x.device)
    return x, torch.arange(S, device=x.device), mask


def tidar_loss(logits, x, y, alpha=1.0):
    """
    logits (N, 2S, V) of the doubled forward, x (N, S) clean tokens, y (N, S) = x shifted by one.
    Clean position i is scored against x_{i+1} (AR), mask position i against x_i itself (diffusion,
    labels not shifted; every mask is [MASK], no corruption ratio). Returns (loss, ar_loss, diff_loss).
    """
    S, V = x.size(1), logits.size(-1)
    ar = F.cross_entropy(logits[:, :S].reshape(-1, V), y.reshape(-1))
    diff = F.cross_entropy(logits[:, S:].reshape(-1, V), x.reshape(-1))
    return (alpha * ar + diff) / (1 + alpha), ar, diff


def training_loss(model, config, x, y, objective="tidar", alpha=1.0, flex=False):
    """
    One batch's loss for either objective, as train.py and experiments/bench.py use it: (loss, ar_loss,
    diff_loss). 'tidar': the doubled sequence. 'ar': the plain AR baseline, the same model on the clean half
    alone (diff_loss None). model may be wrapped (compiled, DDP); config is the plain model's.
    """
    if objective == "ar":
        logits = model(*ar_inputs(x, flex))  # (N, S, V)
        ar = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return ar, ar, None
    logits = model(*tidar_inputs(x, config.block_len, config.mask_id, flex))  # (N, 2S, V)
    return tidar_loss(logits, x, y, alpha)


@torch.no_grad()
def evaluate_batch(model, config, x, y, flex=False):
    """
    What train.py's evaluations and experiments/ablations.py report for a batch of val windows, for a model
    of either objective: (AR loss, diffusion loss, draft accuracy (B,)), all from the doubled forward, whose
    clean half is exactly a causal forward. Draft accuracy at offset r: how often the one-step diffusion
    argmax at offset r of its block is the true token there.
    """
    S, B = x.size(1), config.block_len
    logits = model(*tidar_inputs(x, B, config.mask_id, flex))  # (N, 2S, V)
    _, ar, diff = tidar_loss(logits, x, y)
    hits = (logits[:, S:].argmax(-1) == x).view(-1, B).float().mean(0)  # (B,): by position % B
    return ar.item(), diff.item(), hits.cpu()


# -----------------------------------------------------------------------------
# 4. The KV cache


class KVCache:
    """
    Static K/V buffers for every layer, allocated once (as gpt-fast does), with a committed length per row.
    A forward writes all of its tokens' K/V at entries length .. length + T - 1 of each row and attends over
    the whole buffer through a mask that hides every entry it may not see. What is kept is decided after:
    committing d_0 .. d_n, or rolling back rejected drafts, is setting `length`; rows past it are scratch
    that the next forward overwrites. So the shapes of a decode step never depend on how long the text
    is, and the step can be captured as a CUDA graph.
    """

    def __init__(self, config, batch_size, max_len, device=None, dtype=torch.float32):
        # (choice) rounded up to a multiple of 16: GPU attention kernels pad a mask's rows to this anyway
        max_len = -(-max_len // 16) * 16
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)  # (N,): committed, per row
        self.max_len = max_len

    @property
    def device(self):
        return self.length.device

    def write(self, layer, keys, values):
        """Write keys, values (N, nh, T, hs) at each row's entries length .. length + T - 1; return the
        whole buffers."""
        entries = self.length[:, None] + torch.arange(keys.size(2), device=keys.device)  # (N, T)
        index = entries[:, None, :, None].expand_as(keys)  # (N, nh, T, hs)
        self.keys[layer].scatter_(2, index, keys.to(self.keys.dtype))
        self.values[layer].scatter_(2, index, values.to(self.values.dtype))
        return self.keys[layer], self.values[layer]  # (N, nh, max_len, hs)


def pick_device(name="auto"):
    """'auto' takes cuda, then mps, then cpu; a named device must exist on this machine."""
    found = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    available = [d for d, ok in found.items() if ok]
    if name != "auto" and name not in available:
        raise ValueError(f"--device={name} is not available here: use auto or one of {', '.join(available)}")
    return available[0] if name == "auto" else name


# -----------------------------------------------------------------------------
# `python tidar.py`: the masks as pictures, in the manner of the paper's Figure 3


def draw_mask(mask, rows, cols):
    """rows, cols: one (group, label) per query / key; a bar separates groups. '#' = may attend."""
    new_group = lambda labels: [i > 0 and labels[i][0] != labels[i - 1][0] for i in range(len(labels))]
    col_bar, row_bar = new_group(cols), new_group(rows)
    cell = lambda text, c: ("| " if col_bar[c] else "") + f"{text:<2}"
    width = max(len(f"{g} {l}") for g, l in rows) + 2
    groups = "".join(cell(g if c == 0 or col_bar[c] else "", c) for c, (g, l) in enumerate(cols))
    lines = [" " * width + groups, " " * width + "".join(cell(l, c) for c, (g, l) in enumerate(cols))]
    for r, (g, l) in enumerate(rows):
        if row_bar[r]:
            lines.append(" " * width + "".join(("+-" if c else "") + "--" for c in col_bar))
        cells = "".join(cell("#" if mask[r, c] else ".", c) for c in range(len(cols)))
        lines.append(f"{g} {l}".ljust(width) + cells)
    return "\n".join(line.rstrip() for line in lines)


if __name__ == "__main__":
    S, B = 8, 4
    clean = [("x", str(i)) for i in range(S)]
    masks = [(f"m{i // B}", str(i)) for i in range(S)]  # group = block, label = position id
    print(f"TiDAR training mask, S={S}, B={B}: x = clean tokens, mb = [MASK] block b; label = position id")
    print("rows are queries, columns keys; # = may attend\n")
    print(draw_mask(tidar_training_mask(S, B), clean + masks, clean + masks))

    L, k = 2, 3
    groups = ["c"] * L + ["d"] * k + [f"b{b}" for b in range(1, k + 1) for s in range(k)]
    step = [(g, str(p)) for g, p in zip(groups, list(range(L)) + decode_step_positions(L, k).tolist())]
    print(f"\n\nTiDAR decode-step mask, L={L} cached tokens, draft length k={k}: c = cache, "
          f"d = d_0 .. d_{k - 1},")
    print("bb = mask block b, the pre-draft for 'd_0 .. d_{b-1} accepted'; label = position id\n")
    print(draw_mask(decode_step_mask(L, k), step[L:], step))
