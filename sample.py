"""
TiDAR decoding: draft, verify, cache, roll back, one forward per step (the paper's Figure 2; README,
"Decoding: one forward per step"). generate_ar is the reference, one token per forward; generate_tidar
commits 1 to k tokens per forward and, with beta = 1, is lossless against it: the same greedy output token
for token, the same distribution when sampling. Each decodes one prompt or a batch (each row with its own
length, acceptance and stopping), reads back to the host once per step, and on CUDA replays its step from a
CUDA graph. experiments/ablations.py's generate_speculative, the paper's baseline, reuses verify.

    python sample.py --prompt "def fibonacci(n):"            # greedy, the checkpoint in out/
    python sample.py --prompt "def fibonacci(n):" --compare  # and plain AR beside it, same model
    python sample.py --prompt FILE:prompt.txt --show         # draw each step's drafts
    python sample.py --prompt "import os" --batch_size=8 --temperature=0.8  # 8 samples, decoded together
"""
import argparse
import sys

from configurator import fail, quiet_exits, read_prompts, timed
from guards import check_request, load_model

if __name__ == "__main__":
    sys.excepthook = quiet_exits()  # Ctrl-C, from here on, is one line; so is a closed pipe (`... | head`)
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from tidar import KVCache, causal_mask, decode_step_mask, decode_step_positions  # noqa: E402
from tidar import pick_device, place_step_mask, prefill_mask  # noqa: E402

# -----------------------------------------------------------------------------
# The decoders. What they call is below them: verify and the distributions, then the plumbing (as_batch,
# new_cache, prefill, uniforms, run: the loop that reads each step's (d, n, y) back and stops each row).


@torch.no_grad()
def generate_ar(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, generator=None, capture=True):
    """
    Plain AR decoding with a KV cache, one token per forward: the reference. prompt_ids is one prompt (a
    list of ids) or a batch (a list of lists); returns the new token ids (a list of lists for a batch).
    (choice) An empty prompt means "start of a document": it becomes [<|endoftext|>], as in GPT-2.
    """
    config = model.config
    prompts, one = as_batch(prompt_ids, config.eot_id)
    check_request(config, prompts, max_new_tokens, temperature, top_k)
    cache, last = new_cache(model, prompts, max_new_tokens, 1)
    draw = uniforms(len(prompts), 1, temperature, generator, cache.device)
    logits, _ = prefill(model, prompts, 0, cache)  # (N, V): the AR output after each prompt's last token
    d0, _ = choose(logits, temperature, top_k, draw()[:, 0])  # (N,): decided, not yet in the cache

    def step(u):  # d_0 goes into the cache; the output after it decides the next token
        L = cache.length  # (N,)
        mask = causal_mask(1, L, cache.max_len, cache.device)
        logits = model(d0[:, None], L[:, None], mask, cache)[:, 0]  # (N, V)
        y, _ = choose(logits, temperature, top_k, u[:, 0])
        cache.length.copy_(torch.minimum(L + 1, last))  # commit d_0 (a row never grows past `last`)
        d = d0.clone()
        d0.copy_(y)
        return d[:, None], torch.zeros_like(y), y  # fed d_0, no drafts, y

    out, _ = run(step, d0, draw, max_new_tokens, config.eot_id, capture)
    return out[0] if one else out


@torch.no_grad()
def generate_tidar(model, prompt_ids, max_new_tokens, draft_len=None, temperature=0.0, top_k=None, beta=1.0,
                   rule="lossless", generator=None, capture=True):
    """
    TiDAR decoding (the paper's Figure 2) of one prompt or a batch, as generate_ar. Returns (new_token_ids,
    stats), a list of each for a batch: stats["forwards"] counts forward passes (prefill included),
    stats["committed"] the tokens each step committed (n + 1), stats["trace"] per step the tokens
    d_0 .. d_{k-1}, n and y (for --show).
    rule="paper" is the authors' released rule (README, "The paper's own rule"): not lossless.
    """
    config = model.config
    k = draft_len if draft_len is not None else config.block_len
    prompts, one = as_batch(prompt_ids, config.eot_id)
    check_request(config, prompts, max_new_tokens, temperature, top_k, 2 * k, k, beta, rule)
    N, T, paper = len(prompts), k + k * k, rule == "paper"  # N rows (the batch), T queries per step
    cache, last = new_cache(model, prompts, max_new_tokens, T)
    # a step's 2k uniforms: u[:, :k] verify d_1 .. d_{k-1} and draw y, u[:, k:2k-1] draw the next drafts,
    # u[:, 2k-1] the paper's rule's y
    draw = uniforms(N, 2 * k, temperature, generator, cache.device)
    rows = torch.arange(N, device=cache.device)
    mask_ids = torch.full((N, k * k), config.mask_id, device=cache.device)
    own = decode_step_mask(0, k, device=cache.device)  # (T, T): a step's mask among its own tokens, fixed

    # Prefill: each prompt (causal), then k masks at positions P .. P+k-1 that see the whole prompt and each
    # other. d_0 comes from the AR output at p_{P-1} (mixed with mask slot 0; under the paper's rule slot 0
    # alone, (choice) as at every later step); slots 1 .. k-1 are the drafts.
    ar_last, slots = prefill(model, prompts, k, cache)  # (N, V), (N, k, V)
    u = draw()
    d0, _ = choose(slots[:, 0] if paper else mix(ar_last, slots[:, 0], beta), temperature, top_k, u[:, 0])
    drafts, q = choose(slots[:, 1:], temperature, top_k, u[:, 1:k])  # d_1 .. d_{k-1} (N, k-1) ~ q (N, k-1, V)

    # The step updates its state (d0, drafts, q, cache.length) in place and takes pre-drawn uniforms, so that
    # it reads and writes only tensors that stay put: then it can be captured as a CUDA graph and replayed.
    def step(u):  # u (N, 2k): the step's uniforms
        L = cache.length  # (N,): the cache's own tensor, not a copy; all that reads it comes before 4
        # 1. Draft and pre-draft in one forward: d_0 .. d_{k-1} at L .. L+k-1 (causal), then blocks 1 .. k;
        #    block b (positions L+b .. L+b+k-1) sees the cache and d_0 .. d_{b-1}: it is the pre-draft for
        #    "d_0 .. d_{b-1} committed". All T tokens' K/V are written to the cache past its committed length.
        d = torch.cat([d0[:, None], drafts], dim=1)  # (N, k)
        # The paper's mask trick (README, "Decoding: one forward per step"): own, built once, placed after
        # each row's L cache entries.
        pos, mask = decode_step_positions(L, k, cache.device), place_step_mask(own, L, cache.max_len)
        logits = model(torch.cat([d, mask_ids], dim=1), pos, mask, cache)  # (N, T, V)
        # ar[:, j]: the AR output after d_j; blocks[:, b-1]: block b. Row j of the target is for position
        # L+j+1, where block j+1's slot 0 sits too.
        ar, blocks = logits[:, :k], logits[:, k:].view(N, k, k, -1)  # (N, k, V), (N, k, k, V)
        target = mix(ar, blocks[:, :, 0], beta)  # (N, k, V)

        # 2. Verify d_1 .. d_{k-1} in order, each against the target of its position: the AR output after the
        #    token before it (mixed with slot 0 when beta < 1); stop at the first rejection (the paper's rule:
        #    by argmax match).
        # 3. Decide y at L+n+1: the correction, or the bonus token when all were accepted.
        p = probabilities(target, 0.0 if paper else temperature, top_k)
        n, y = verify(p, q, drafts, u[:, :k])  # (N,) each
        chosen = blocks[rows, n]  # (N, k, V): block n+1, whose context is exactly the tokens now committed
        if paper:  # the authors' rule: drafts pass by argmax match, and y is slot 0 of block n+1, unverified
            y, _ = choose(chosen[:, 0], temperature, top_k, u[:, -1])

        # 4. Commit d_0 .. d_n: their K/V, written by this forward with causal attention, are what an AR
        #    model would have written. Roll back everything after them (rejected drafts, all masks).
        cache.length.copy_(torch.minimum(L + n + 1, last))

        # 5. Next drafts: d_0 = y; the drafts are slots 1 .. k-1 of block n+1 (its slot 0 sat at y's position,
        #    so not slots 0 .. k-2).
        next_drafts, next_q = choose(chosen[:, 1:], temperature, top_k, u[:, k : 2 * k - 1])
        d0.copy_(y)
        drafts.copy_(next_drafts)
        q.copy_(next_q)
        return d, n, y

    out, traces = run(step, d0, draw, max_new_tokens, config.eot_id, capture)
    stats = [dict(forwards=1 + len(t), committed=[n + 1 for _, n, _ in t], trace=t) for t in traces]
    return (out[0], stats[0]) if one else (out, stats)


# -----------------------------------------------------------------------------
# Verification, and the distributions. Greedy decoding is the same code as sampling: its distributions are
# one-hot at the argmax and its random numbers are 0, so a draft is accepted iff it is the argmax, and the
# correction or bonus token is the argmax. The target (AR) and the draft (diffusion) distributions go
# through the same function, so the q used to accept a draft is exactly the one it was drawn from.


def verify(p, q, drafts, u):
    """
    Steps 2 and 3, for every row at once. p (N, D+1, V): row j is the target distribution of the position
    after d_j (the README's p_{j+1}). drafts (N, D) = d_1 .. d_D, drawn from q (N, D, V) (so q[:, j] is the
    README's q_{j+1}); u (N, D+1) uniforms in [0, 1).
    d_j is accepted when u < min(1, p/q), and n is the length of the leading run of acceptances; y, at the
    position after d_n, is drawn from normalize(max(0, p - q)) after a rejection, or from p itself when all
    were accepted (the bonus token: there is no q there, the same formula with q = 0). Returns (n, y), (N,)
    each. (choice) This is standard speculative sampling, which the paper cites but does not spell out: the
    output is then distributed exactly as AR sampling from the same model.
    """
    D = drafts.size(1)  # k - 1 for TiDAR, k for speculative decoding
    accepted = u[:, :D] < accept_probability(p[:, :D], q, drafts)  # (N, D)
    n = accepted.long().cumprod(dim=1).sum(dim=1)  # (N,)
    rows = torch.arange(p.size(0), device=p.device)
    q = F.pad(q, (0, 0, 0, 1))  # (N, D+1, V): a zero row after the last draft, for the bonus
    return n, sample_from(residual(p[rows, n], q[rows, n]), u[:, D])


def accept_probability(p, q, tokens):
    """A token drawn from q is kept with probability min(1, p/q): p, q (..., V), tokens (...)."""
    t = tokens[..., None]
    return (p.gather(-1, t) / q.gather(-1, t)).clamp(max=1.0)[..., 0]


def residual(p, q):
    """What to sample after a rejection: normalize(max(0, p - q)). Then P(output = x) = p(x) exactly."""
    r = (p - q).clamp(min=0)
    total = r.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, r / total, p)  # total = 0 only when p == q, where no draft is ever rejected


def probabilities(logits, temperature, top_k):
    """The distribution to draw from, (..., V): softmax(logits / temperature) over the top_k; when greedy,
    one-hot at the argmax."""
    if temperature == 0:
        one_hot = torch.zeros_like(logits, dtype=torch.float32)
        return one_hot.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    logits = logits.float()
    # <= 0 before dividing: no overflow, even for a tiny temperature
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return F.softmax(logits, dim=-1)


def sample_from(p, u):
    """Draw from p (..., V) with uniforms u (...) by inverting the cumulative distribution (no host sync).
    u = 0 picks a one-hot's token."""
    cdf = p.cumsum(dim=-1)
    return (cdf <= u[..., None] * cdf[..., -1:]).sum(dim=-1).clamp(max=p.size(-1) - 1)


def choose(logits, temperature, top_k, u):
    """Tokens for logits (..., V) and the distribution they were drawn from."""
    q = probabilities(logits, temperature, top_k)
    return sample_from(q, u), q


def mix(ar_logits, diffusion_logits, beta):
    """The target for a position: beta * AR + (1 - beta) * diffusion slot 0 ("trust AR" ratio)."""
    return ar_logits if beta == 1 else beta * ar_logits + (1 - beta) * diffusion_logits


# -----------------------------------------------------------------------------
# Plumbing shared by the decoders: the batch, the cache, the prefill, the random numbers, the loop
# (guards.check_request turns a request that cannot be decoded into one clear error first)


def as_batch(prompt_ids, eot_id):
    """One prompt (a list of ids) or a batch (a list of lists) -> (list of prompts, whether it was one)."""
    one = len(prompt_ids) == 0 or not isinstance(prompt_ids[0], (list, tuple))
    return [list(prompt) or [eot_id] for prompt in ([prompt_ids] if one else prompt_ids)], one


def new_cache(model, prompts, max_new_tokens, T):
    """
    A static cache for the batch, with room for T tokens per forward, and `last`, the longest committed
    length a row can need (its prompt and max_new_tokens - 1 tokens: the last token is never fed back).
    (choice) A row that is done keeps its place: commits stop at `last`, and its outputs are ignored.
    """
    device, dtype = next((w.device, w.dtype) for w in model.parameters())
    cache = KVCache(model.config, len(prompts), max(map(len, prompts)) + max_new_tokens + T, device, dtype)
    return cache, torch.tensor([len(prompt) + max_new_tokens - 1 for prompt in prompts], device=device)


def prefill(model, prompts, k, cache):
    """
    The first forward, for the whole batch: each prompt (causal), then k masks at positions P .. P+k-1 that
    see the whole prompt and each other (k = 0 for AR); shorter prompts are padded with more masks. Keeps
    the prompts' K/V. Returns the AR logits after each prompt's last token (N, V) and the k slots (N, k, V).
    """
    P = torch.tensor([len(prompt) for prompt in prompts], device=cache.device)  # (N,)
    W = max(len(prompt) for prompt in prompts) + k
    padded = [prompt + [model.config.mask_id] * (W - len(prompt)) for prompt in prompts]
    idx = torch.tensor(padded, device=cache.device)  # (N, W)
    mask = prefill_mask(P, k, W, cache.max_len, cache.device)  # (N, W, max_len)
    logits = model(idx, torch.arange(W, device=cache.device), mask, cache)  # (N, W, V); mask s sits at P + s
    cache.length.copy_(P)  # the masks and the padding were scratch
    rows = torch.arange(len(prompts), device=cache.device)[:, None]
    return logits[rows[:, 0], P - 1], logits[rows, P[:, None] + torch.arange(k, device=cache.device)]


def uniforms(N, count, temperature, generator, device):
    """A function that draws the random numbers of a step, (N, count) uniforms in [0, 1), into one tensor.
    Greedy draws none: all zeros, and u = 0 picks a one-hot's token."""
    u = torch.zeros(N, count, device=device)
    return lambda: u.uniform_(generator=generator) if temperature > 0 else u


def trim(out, eot_id, max_new_tokens):
    """Cut at the first <|endoftext|> and at max_new_tokens; True when generation is over. (choice) The
    <|endoftext|> is kept as the last token, so the caller can tell why it stopped."""
    if eot_id in out:
        out = out[: out.index(eot_id) + 1]
    return out[:max_new_tokens], eot_id in out or len(out) >= max_new_tokens


def run(step, d0, draw, max_new_tokens, eot_id, capture):
    """
    The loop around a decoder's step: draw the step's random numbers, step, and read back what the host
    needs: the tokens fed d (N, 1) for AR, (N, k) for TiDAR, (N, k+1) for speculative decoding, the accepted
    count n and the decided y. Each live row gets d_1 .. d_n, y (d_0 is already out: it was the last step's
    y), and stops at <|endoftext|> or max_new_tokens. Returns per row its new tokens and the
    trace [(d, n, y)] of its steps.
    """
    out, done = map(list, zip(*(trim([t], eot_id, max_new_tokens) for t in d0.tolist())))  # the prefill's d_0
    traces = [[] for _ in out]
    if capture and d0.is_cuda:
        step = cuda_graph(step)
    while not all(done):
        d, n, y = step(draw())
        read = torch.cat([d, n[:, None], y[:, None]], dim=1).tolist()  # the one read back (a sync) of a step
        for i, (*d_i, n_i, y_i) in enumerate(read):
            if not done[i]:
                traces[i].append((d_i, n_i, y_i))
                out[i], done[i] = trim(out[i] + d_i[1 : n_i + 1] + [y_i], eot_id, max_new_tokens)
    return out, traces


def cuda_graph(step):
    """
    step(*inputs) replayed from a CUDA graph: its kernels are recorded once and relaunched by one call, so a
    step of a small model costs the GPU's time, not Python's. The first call is a real step, run eagerly on
    a side stream (the warm-up a capture needs); then the step is recorded, and every later call copies its
    inputs into the graph's own, replays, and returns the same output tensors, refilled. Each generation
    records its own graph.
    """
    graph = inputs = outputs = None

    def replay(*args):
        nonlocal graph, inputs, outputs
        if graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                result = step(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph, inputs = torch.cuda.CUDAGraph(), [a.clone() for a in args]
            with torch.cuda.graph(graph):
                outputs = step(*inputs)
            return result
        for i, a in zip(inputs, args):
            i.copy_(a)
        graph.replay()
        return outputs

    return replay


# -----------------------------------------------------------------------------
# Command line

parser = argparse.ArgumentParser(description="TiDAR decoding of a checkpoint written by train.py")
arg = parser.add_argument
arg("--prompt", default="", help="text, or FILE:path (prompts separated by lines '<|endoftext|>'); empty = "
    "start of a document")
arg("--out_dir", default="out", help="folder with ckpt.pt")
arg("--num_samples", type=int, default=1, help="times to decode, each with its own seed")
arg("--batch_size", type=int, default=1, help="sequences decoded together: copies of the prompt, or the "
    "prompts of a FILE: that holds several, this many at a time")
arg("--max_new_tokens", type=int, default=None, help="default: 256, or what the model's context leaves")
arg("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
arg("--top_k", type=int, default=None)
arg("--draft_len", type=int, default=None, help="k; default: the block length B of training")
arg("--beta", type=float, default=1.0, help="targets = beta * AR + (1 - beta) * mask slot 0: 1 = trust AR "
    "(lossless under --rule=lossless); the authors' default with --rule=paper is 0")
arg("--rule", default="lossless", choices=["lossless", "paper"], help="paper: the authors' released rule, "
    "which commits slot 0 of each block unverified")
arg("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="float32 keeps "
    "--compare's identity exact; bfloat16 is faster on a GPU")
arg("--eager", action="store_true", help="on CUDA: no CUDA graph, every kernel launched from Python")
arg("--seed", type=int, default=1337)
arg("--device", default="auto", help="auto, cuda, mps or cpu")
arg("--compare", action="store_true", help="also decode with plain AR and compare")
arg("--show", action="store_true", help="draw each step: accepted, rejected, decided")


def show_step(enc, d, n, y, colour):
    """One line per step: d_0 (decided last step), accepted drafts, rejected drafts, then y: in bold, green,
    red struck through and bold yellow on a terminal, else marked as plain text."""
    text = lambda ids: enc.decode(ids).encode("unicode_escape").decode().replace(" ", "·")  # spaces seen
    parts = [(d[:1], "1", "{}"), (d[1 : n + 1], "32", "{}"), (d[n + 1 :], "9;31", "[-{}-]"),
             ([y], "1;33", "{{+{}+}}")]
    parts = [(text(ids), code, plain) for ids, code, plain in parts]  # text, terminal colour, plain-text form
    if colour:
        return "".join(f"\033[{code}m{s}\033[0m" for s, code, _ in parts if s)
    return "".join(plain.format(s) for s, _, plain in parts if s)


def main(args):
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        fail(str(e), 2)
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}", 2)
    model, enc = load_model(args.out_dir, args.device, getattr(torch, args.dtype))
    texts, prompts = read_prompts(args.prompt, enc, args.batch_size)
    k, eot, colour = args.draft_len or model.config.block_len, model.config.eot_id, sys.stdout.isatty()
    if args.max_new_tokens is None:  # what fits beside the longest prompt and the drafts' room, at most 256
        longest = max(len(prompt) or 1 for prompt in prompts)
        args.max_new_tokens = max(1, min(256, model.config.seq_len - 2 * k - longest))
    generator = torch.Generator(device=args.device)
    options = dict(temperature=args.temperature, top_k=args.top_k, generator=generator,
                   capture=not args.eager)
    for sample_idx in range(args.num_samples):
        for start in range(0, len(prompts), args.batch_size):
            batch, batch_texts = (x[start : start + args.batch_size] for x in (prompts, texts))
            tidar = lambda: generate_tidar(model, batch, args.max_new_tokens, args.draft_len, beta=args.beta,
                                           rule=args.rule, **options)
            ar = lambda: generate_ar(model, batch, args.max_new_tokens, **options)
            try:  # first calls pay for kernel selection and allocation: warm both up before timing
                if args.compare and sample_idx == 0 and start == 0:
                    tidar(), ar()
                generator.manual_seed(args.seed + sample_idx)
                (outs, stats), seconds = timed(tidar, args.device)
            except ValueError as e:  # a request that cannot be decoded: what to change, before decoding
                fail(str(e), 2)
            for text, out, st in zip(batch_texts, outs, stats):
                if args.show:
                    print(f"each step: d_0 (bold), accepted drafts (green{'' if colour else ', unmarked'}), "
                          f"rejected drafts ({'red' if colour else '[-...-]'}), the decided next token "
                          f"({'yellow' if colour else '{+...+}'})")
                    for s, (d, n, y) in enumerate(st["trace"], 1):
                        print(f"step {s:3d} | {show_step(enc, d, n, y, colour)}")
                    print("-" * 60)
                print(text + enc.decode([t for t in out if t != eot]))
                hist = [st["committed"].count(c) for c in range(1, k + 1)]
                per_forward = len(out) / st["forwards"]
                print(f"--- TiDAR: {len(out)} new tokens, {st['forwards']} forwards, {per_forward:.2f} "
                      f"tokens/forward, steps committing 1..{k} tokens: {hist}")
            n_tokens = sum(map(len, outs))
            print(f"--- TiDAR ({args.rule}): {n_tokens} new tokens in {seconds:.2f} s, "
                  f"{n_tokens / seconds:.1f} tokens/s on {args.device}, batch of {len(batch)}")
            if args.compare:
                generator.manual_seed(args.seed + sample_idx)
                ar_outs, ar_seconds = timed(ar, args.device)
                ar_tokens = sum(map(len, ar_outs))
                same = f", outputs identical: {ar_outs == outs}" if args.temperature == 0 else ""
                print(f"--- AR: {ar_tokens} new tokens, {ar_tokens / ar_seconds:.1f} tokens/s; "
                      f"TiDAR/AR speed: {(n_tokens / seconds) / (ar_tokens / ar_seconds):.2f}x{same}")


if __name__ == "__main__":
    main(parser.parse_args())
