"""
TiDAR decoding: draft, verify, cache, roll back, with one forward per step (TIDAR.md section 3).

    python sample.py --prompt "def fibonacci(n):"            # greedy, the checkpoint in out/
    python sample.py --prompt "def fibonacci(n):" --compare  # and plain AR beside it, same model
    python sample.py --prompt FILE:prompt.txt --show         # draw each step's drafts

generate_ar is the reference: one token per forward, the same KV cache. generate_tidar commits between
1 and k tokens per forward and, with beta = 1, is lossless against it: greedy output is identical token
for token, sampled output has exactly the same distribution.
"""
import argparse
import os
import sys
import time

import torch
from torch.nn import functional as F

from tidar import GPT, GPTConfig, KVCache, get_tokenizer, pick_device
from tidar import causal_mask, decode_step_mask, decode_step_positions, prefill_mask

# -----------------------------------------------------------------------------
# Distributions. The target (AR) and the draft (diffusion) distributions go through the same function,
# so the q used to accept a draft is exactly the distribution it was drawn from (TIDAR.md section 5).


def probabilities(logits, temperature, top_k):
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return F.softmax(logits, dim=-1)


def choose(logits, temperature, top_k, generator):
    """Tokens for logits (..., V) and the distribution they were drawn from (None when greedy)."""
    if temperature == 0:
        return logits.argmax(dim=-1), None
    p = probabilities(logits, temperature, top_k)
    return torch.multinomial(p.view(-1, p.size(-1)), 1, generator=generator).view(p.shape[:-1]), p


def mix(ar_logits, diffusion_logits, beta):
    """The target for a position: beta * AR + (1 - beta) * diffusion slot 0 ("trust AR" ratio)."""
    return ar_logits if beta == 1 else beta * ar_logits + (1 - beta) * diffusion_logits


# (choice, TIDAR.md section 3) Verification when sampling is standard speculative sampling, which the paper
# cites but does not spell out: the output is then distributed exactly as AR sampling from the same model.


def accept_probability(p, q, token):
    """A draft drawn from q is kept with probability min(1, p/q)."""
    return torch.clamp(p[token] / q[token], max=1.0)


def residual(p, q):
    """What to sample after a rejection: normalize(max(0, p - q)). Then P(output = x) = p(x) exactly."""
    r = (p - q).clamp(min=0)
    total = r.sum()
    return r / total if total > 0 else p  # total = 0 only when p == q, where no draft is ever rejected


def verify(target, drafts, q, temperature, top_k, generator):
    """
    Steps 2 and 3. target (k, V): row j is the distribution of position L+j+1 (AR output after d_j).
    drafts (k-1,) = d_1 .. d_{k-1}, drawn from q (k-1, V). Returns (n, y): the number of drafts accepted
    (stopping at the first rejection), and the next token y at position L+n+1.
    """
    k = target.size(0)
    if temperature == 0:
        best = target.argmax(dim=-1)  # (k,)
        n = int((drafts == best[: k - 1]).cumprod(dim=0).sum())  # leading drafts equal to the AR argmax
        return n, int(best[n])  # the correction at the first mismatch, or the bonus token
    p = probabilities(target, temperature, top_k)  # (k, V)
    for j in range(k - 1):
        u = torch.rand((), device=p.device, generator=generator)
        if u >= accept_probability(p[j], q[j], drafts[j]):  # rejected: y from the residual
            return j, int(torch.multinomial(residual(p[j], q[j]), 1, generator=generator))
    return k - 1, int(torch.multinomial(p[k - 1], 1, generator=generator))  # all accepted: the bonus


# -----------------------------------------------------------------------------
# The two decoders


def check_request(config, prompt_ids, max_new_tokens, temperature, top_k, k=0, beta=1.0):
    """Bad requests fail before decoding starts, each with a message that says what to change. k = 0: AR."""
    P = len(prompt_ids)
    if not all(0 <= t < config.vocab_size for t in prompt_ids):  # [MASK] = vocab_size is no prompt token
        got = f"{min(prompt_ids)}..{max(prompt_ids)}"
        raise ValueError(f"prompt token ids must lie in [0, {config.vocab_size}), got {got}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or unset), got {top_k}")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if P + max_new_tokens + 2 * k > config.seq_len:  # the last step's blocks reach position L + 2k - 1
        raise ValueError(
            f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) + 2*draft_len ({2 * k}) = "
            f"{P + max_new_tokens + 2 * k} exceeds the model's context of {config.seq_len}: shorten one of them"
        )


def trim(out, eot_id, max_new_tokens):
    """Cut at the first <|endoftext|> and at max_new_tokens; True when generation is over. (choice) The
    <|endoftext|> is kept as the last token, so the caller can tell why it stopped."""
    if eot_id in out:
        out = out[: out.index(eot_id) + 1]
    return out[:max_new_tokens], eot_id in out or len(out) >= max_new_tokens


@torch.no_grad()
def generate_ar(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, generator=None):
    """Plain AR decoding with a KV cache, one token per forward: the reference. Returns the new token ids.
    (choice) An empty prompt means "start of a document": it becomes [<|endoftext|>], as in GPT-2."""
    config, (device, dtype) = model.config, next((p.device, p.dtype) for p in model.parameters())
    prompt_ids = list(prompt_ids) or [config.eot_id]
    check_request(config, prompt_ids, max_new_tokens, temperature, top_k)
    P = len(prompt_ids)
    cache = KVCache(config, P + max_new_tokens, device=device, dtype=dtype)
    positions = torch.arange(config.seq_len, device=device)
    sees_all = torch.ones(1, cache.max_len, dtype=torch.bool, device=device)
    idx = torch.tensor([prompt_ids], device=device)
    logits = model(idx, positions[:P], causal_mask(P, device=device), cache, n_causal=P)  # (1, P, V)
    out = []
    while True:
        token, _ = choose(logits[0, -1], temperature, top_k, generator)
        out, done = trim(out + [int(token)], config.eot_id, max_new_tokens)
        if done:
            return out
        L = cache.length
        logits = model(token.view(1, 1), positions[L : L + 1], sees_all[:, : L + 1], cache, n_causal=1)


@torch.no_grad()
def generate_tidar(
    model, prompt_ids, max_new_tokens, draft_len=None, temperature=0.0, top_k=None, beta=1.0, generator=None
):
    """
    TiDAR decoding. Returns (new_token_ids, stats): stats["forwards"] counts forward passes (prefill
    included), stats["committed"] the tokens each step committed (n + 1), stats["trace"] per step the
    tokens d_0 .. d_{k-1}, n and y (for sample.py --show). Stops like generate_ar.
    """
    config, (device, dtype) = model.config, next((p.device, p.dtype) for p in model.parameters())
    k = draft_len if draft_len is not None else config.block_len
    prompt_ids = list(prompt_ids) or [config.eot_id]
    if k < 1:
        raise ValueError(f"draft_len must be at least 1, got {k}")
    check_request(config, prompt_ids, max_new_tokens, temperature, top_k, k, beta)
    P, m = len(prompt_ids), config.mask_id
    cache = KVCache(config, P + max_new_tokens + k, device=device, dtype=dtype)
    stats = {"forwards": 1, "committed": [], "trace": []}

    # Prefill: the prompt (causal) and k masks at positions P .. P+k-1 that see the whole prompt and each
    # other. Only the prompt's K/V enter the cache (n_causal = P).
    idx = torch.tensor([prompt_ids + [m] * k], device=device)
    pos = torch.arange(P + k, device=device)
    logits = model(idx, pos, prefill_mask(P, k, device), cache, n_causal=P)[0]  # (P + k, V)
    d0, _ = choose(mix(logits[P - 1], logits[P], beta), temperature, top_k, generator)  # AR output at p_{P-1}
    drafts, q = choose(logits[P + 1 :], temperature, top_k, generator)  # d_1 .. d_{k-1} from mask slots 1 .. k-1
    out, done = trim([int(d0)], config.eot_id, max_new_tokens)

    # The paper's mask trick: every step has the same k + k*k queries, so the mask's square part never
    # changes and its cache columns are all True. Build one wide mask once and slice off its last L + T columns.
    T = k + k * k
    step_mask = torch.ones(T, cache.max_len + T, dtype=torch.bool, device=device)
    step_mask[:, cache.max_len :] = decode_step_mask(0, k, device)
    step_positions = decode_step_positions(0, k, device)  # (T,), relative to L
    blocks_of_masks = torch.full((k * k,), m, device=device)  # (k*k,)

    while not done:
        L = cache.length
        # 1. Draft and pre-draft in one forward: d_0 .. d_{k-1} at L .. L+k-1 (causal), then blocks 1 .. k;
        #    block b (positions L+b .. L+b+k-1) sees the cache and d_0 .. d_{b-1}: it is the pre-draft for
        #    "d_0 .. d_{b-1} accepted". The d tokens' K/V are written to the cache (n_causal = k).
        d = torch.cat([d0.view(1), drafts])  # (k,)
        idx = torch.cat([d, blocks_of_masks]).view(1, T)
        logits = model(idx, L + step_positions, step_mask[:, cache.max_len - L :], cache, n_causal=k)[0]  # (T, V)
        stats["forwards"] += 1
        ar, blocks = logits[:k], logits[k:].view(k, k, -1)  # ar[j]: after d_j; blocks[b-1]: block b, (k, V)
        target = mix(ar, blocks[:, 0], beta)  # (k, V): row j for position L+j+1; slot 0 of block j+1 is there too

        # 2. Verify d_1 .. d_{k-1} in order against the AR output one position earlier; stop at the first
        #    rejection. 3. Decide y at L+n+1: the correction, or the bonus token when all were accepted.
        n, y = verify(target, drafts, q, temperature, top_k, generator)

        # 4. Commit d_0 .. d_n: their K/V, written by this forward with causal attention, are what an AR
        #    model would have written. Roll back the rest; no [MASK] K/V was ever written.
        cache.rollback(L + n + 1)
        d_list = d.tolist()
        stats["committed"].append(n + 1)
        stats["trace"].append((d_list, n, y))
        out, done = trim(out + d_list[1 : n + 1] + [y], config.eot_id, max_new_tokens)

        # 5. Next state: d_0 = y; the drafts come from block n+1, whose context was exactly the tokens now
        #    committed. Its slot 0 sat at y's position, so the drafts are slots 1 .. k-1, not 0 .. k-2.
        d0 = torch.tensor(y, device=device)
        drafts, q = choose(blocks[n, 1:], temperature, top_k, generator)
    return out, stats


# -----------------------------------------------------------------------------
# Command line

parser = argparse.ArgumentParser(description="TiDAR decoding of a checkpoint written by train.py")
parser.add_argument("--prompt", default="", help='text, or FILE:path; empty = start of a document (<|endoftext|>)')
parser.add_argument("--out_dir", default="out", help="folder with ckpt.pt")
parser.add_argument("--num_samples", type=int, default=1)
parser.add_argument("--max_new_tokens", type=int, default=256)
parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
parser.add_argument("--top_k", type=int, default=None)
parser.add_argument("--draft_len", type=int, default=None, help="k; default: the block length B of training")
parser.add_argument("--beta", type=float, default=1.0, help="1 = trust AR (lossless); < 1 mixes in the drafts")
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
parser.add_argument("--compare", action="store_true", help="also decode with plain AR and compare")
parser.add_argument("--show", action="store_true", help="draw each step: accepted, rejected, decided")


def fail(message):
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_checkpoint(out_dir, device):
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}: train one first with `python train.py` (or pass --out_dir)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        fail(f"cannot load {path} ({why}): retrain or pick another --out_dir")
    try:
        enc = get_tokenizer(ckpt["tokenizer"])
    except (RuntimeError, ValueError) as e:
        fail(str(e))
    if (enc.n_vocab, enc.eot_token) != (model.config.vocab_size, model.config.eot_id):
        fail(
            f"{path} was trained on {model.config.vocab_size} tokens with <|endoftext|> = {model.config.eot_id}, "
            f"but tokenizer {ckpt['tokenizer']!r} has {enc.n_vocab} and {enc.eot_token}: "
            "the checkpoint does not match its tokenizer"
        )
    return model.to(device).eval(), enc


def show_step(enc, d, n, y, colour):
    """One line per step: d_0 (decided last step), accepted drafts, rejected drafts, then y."""
    text = lambda ids: enc.decode(ids).encode("unicode_escape").decode().replace(" ", "·")  # one line, spaces seen
    parts = [  # (text, terminal colour, plain-text form)
        (text(d[:1]), "1", "{}"),
        (text(d[1 : n + 1]), "32", "{}"),
        (text(d[n + 1 :]), "9;31", "[-{}-]"),
        (text([y]), "1;33", "{{+{}+}}"),
    ]
    if colour:  # bold d_0, green accepted, red struck-through rejected, bold yellow y
        return "".join(f"\033[{code}m{s}\033[0m" for s, code, _ in parts if s)
    return "".join(plain.format(s) for s, _, plain in parts if s)


def main(args):
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        fail(str(e))
    text = args.prompt
    if text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            fail(f"cannot read prompt file {text[5:]!r}: {e.strerror}")
    if args.num_samples < 1:
        fail(f"--num_samples must be at least 1, got {args.num_samples}")
    model, enc = load_checkpoint(args.out_dir, args.device)
    prompt_ids = enc.encode(text, allowed_special="all")
    generator = torch.Generator(device=args.device)
    colour = sys.stdout.isatty()
    options = dict(temperature=args.temperature, top_k=args.top_k)
    for sample in range(args.num_samples):
        generator.manual_seed(args.seed + sample)
        try:
            if args.compare and sample == 0:  # warm up both, so that neither timing pays for first-call setup
                generate_tidar(model, prompt_ids, 2, args.draft_len, **options)
                generate_ar(model, prompt_ids, 2, **options)
            t0 = time.perf_counter()
            out, stats = generate_tidar(
                model, prompt_ids, args.max_new_tokens, args.draft_len, beta=args.beta, generator=generator, **options
            )
        except ValueError as e:
            fail(str(e))
        seconds = time.perf_counter() - t0
        if args.show:
            print(f"each step: d_0 (bold), accepted drafts (green{'' if colour else ' as is'}), rejected drafts "
                  f"({'red' if colour else '[-...-]'}), the decided next token ({'yellow' if colour else '{+...+}'})")
            for s, (d, n, y) in enumerate(stats["trace"], 1):
                print(f"step {s:3d} | {show_step(enc, d, n, y, colour)}")
            print("-" * 60)
        print(text + enc.decode([t for t in out if t != model.config.eot_id]))
        k = args.draft_len or model.config.block_len
        hist = [stats["committed"].count(c) for c in range(1, k + 1)]
        print(f"--- TiDAR: {len(out)} new tokens, {stats['forwards']} forwards, "
              f"{len(out) / stats['forwards']:.2f} tokens/forward, steps committing 1..{k} tokens: {hist}, "
              f"{len(out) / seconds:.1f} tokens/s on {args.device}")
        if args.compare:
            generator.manual_seed(args.seed + sample)
            t0 = time.perf_counter()
            ar_out = generate_ar(model, prompt_ids, args.max_new_tokens, generator=generator, **options)
            ar_seconds = time.perf_counter() - t0
            same = f", outputs identical: {ar_out == out}" if args.temperature == 0 else ""
            print(f"--- AR: {len(ar_out)} new tokens, {len(ar_out) / ar_seconds:.1f} tokens/s; "
                  f"TiDAR/AR speed: {(len(out) / seconds) / (len(ar_out) / ar_seconds):.2f}x{same}")


if __name__ == "__main__":
    main(parser.parse_args())
