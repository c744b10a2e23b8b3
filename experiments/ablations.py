"""
The paper in miniature (RESULTS.md, "The paper in miniature"): TiDAR's ablations at a size one GPU or a laptop
can run, each table printed beside the paper's numbers. Greedy, batch 1, held-out prompts (as bench.py's).
  1. the decoding rule: this project's lossless rule against the authors' released one (slot 0 of each
     block committed unverified), at beta = 1, 0.5 and 0; what trusting the drafts costs in quality
  2. the block length B of training against the draft length k of decoding (the paper's Figure 5 / Table 4)
  3. TiDAR against classic speculative decoding with a small separate drafter (the paper's Figure 4)
  4. how a TiDAR model is made: from scratch, or from an AR model's weights as the paper makes all of its
     models (continual pretraining), with other alphas: val losses, draft accuracy, drafts
     accepted, speed
  5. the drafts' target: how often each offset's draft is the AR model's own greedy token, for the one-step
     diffusion's drafts and for the argmax of the AR model's own marginal at that offset (what the diffusion
     loss trains toward, as the AR model estimates it), and the tokens per forward each would give
  6. the masks' target in training, beyond the paper: the data's tokens, or the model's own greedy rollouts
     (experiments/rollouts.py), compared from the same AR start at equal time, greedy and sampled

    python experiments/ablations.py --out_dir=out --block_dirs=out-b4,out,out-b16 --drafter_dir=out-drafter
    python experiments/ablations.py --tables=4 --recipe_dirs=out-scratch,out,out-a03 --ar_dir=out-ar
    python experiments/ablations.py --tables=6 --target_dirs=out,out-rollout
RESULTS.md's section trains the models it needs with train.py.
"""
import argparse
import os
import sys

# Run from anywhere (`python experiments/ablations.py`): the modules it uses sit in the repository's root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import fail, quiet_exits, timed  # noqa: E402

if __name__ == "__main__":
    sys.excepthook = quiet_exits()  # Ctrl-C, from here on, is one line; so is a closed pipe (`... | head`)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import check_fits, held_out_prompts, integers  # noqa: E402
from data.prepare import DATA_DIR  # noqa: E402
import sample  # noqa: E402
from guards import check_request, load_model  # noqa: E402
from sample import generate_ar, generate_tidar  # noqa: E402
from tidar import causal_mask, evaluate_batch, pick_device  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--tables", default="1,2,3,4,5,6", help="comma-separated: which tables to print (2, 3, "
                    "4 and 6 need the checkpoints named below)")
parser.add_argument("--out_dir", default="out", help="the TiDAR checkpoint of tables 1, 3 and 5")
parser.add_argument("--block_dirs", default="", help="comma-separated TiDAR checkpoints trained with other B")
parser.add_argument("--drafter_dir", default="", help="a small AR checkpoint (--objective=ar), the same data")
parser.add_argument("--recipe_dirs", default="", help="comma-separated TiDAR checkpoints made different ways "
                    "(table 4): from scratch, from an AR model (train.py --init_from), other settings")
parser.add_argument("--target_dirs", default="", help="comma-separated TiDAR checkpoints trained toward "
                    "other targets from the same start (table 6): experiments/rollouts.py --rollout=...")
parser.add_argument("--temperature", type=float, default=0.8, help="table 6's sampled decoding")
parser.add_argument("--ar_dir", default="", help="the AR baseline whose val AR loss table 4 prints beside")
parser.add_argument("--prompts", default="val", help="'val' (the val split of --data_dir), a text file, or a "
                    "folder of .py files, as in bench.py")
parser.add_argument("--data_dir", default=os.path.join(DATA_DIR, "pycode"), help="the dataset: val prompts, "
                    "and table 4's val windows (default: data/pycode in the repository)")
parser.add_argument("--draft_lens", default="4,8,16", help="k for tables 2 and 4; table 5 takes the smallest")
parser.add_argument("--speculative_lens", default="2,4,8", help="drafter proposals per step for table 3")
parser.add_argument("--num_prompts", type=int, default=16)
parser.add_argument("--prompt_len", type=int, default=64)
parser.add_argument("--max_new_tokens", type=int, default=None,
                    help="default: 256, or what every context leaves")
parser.add_argument("--val_windows", type=int, default=64, help="val windows of S tokens, table 4's losses")
parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")


def measure(decode, prompts, device):
    """Decode each prompt alone: (new tokens, target forwards, seconds, outputs, drafter forwards), summed."""
    decode(prompts[0])  # warm-up
    tokens = forwards = drafter = seconds = 0
    outputs = []
    for p in prompts:
        (out, stats), s = timed(lambda: decode(p), device)
        stats = stats or {"forwards": len(out)}  # AR: one forward per token
        tokens, forwards, seconds = tokens + len(out), forwards + stats["forwards"], seconds + s
        drafter += stats.get("drafter_forwards", 0)
        outputs.append(out)
    return tokens, forwards, seconds, outputs, drafter


@torch.no_grad()
def ar_judgement(model, prompts, outputs):
    """Of the generated tokens, the share that is not the AR model's own greedy choice given the text before
    it, and the AR model's mean log-likelihood per token of the generated text (one causal forward each)."""
    other, logp, n = 0, 0.0, 0
    for p, out in zip(prompts, outputs):
        seq = torch.tensor([p + out], device=next(model.parameters()).device)
        T = seq.size(1)
        logits = model(seq, torch.arange(T, device=seq.device), causal_mask(T, device=seq.device))
        pred = F.log_softmax(logits[0, len(p) - 1 : -1].float(), dim=-1)  # (len(out), V): for each new token
        target = seq[0, len(p) :]
        other += (pred.argmax(-1) != target).sum().item()
        logp += pred.gather(-1, target[:, None]).sum().item()
        n += len(out)
    return other / n, logp / n


def table_rules(model, prompts, max_new_tokens, device):
    k = model.config.block_len
    print(f"\n1. decoding rules, k = {k}: this project's lossless rule against the authors' released rule")
    print(f"{'rule':>9} {'beta':>5} {'tok/fwd':>8} {'tok/s':>9} {'vs AR':>7} {'not AR greedy':>14} "
          f"{'AR log-lik/token':>17} {'= AR':>5}")
    ar = lambda p: (generate_ar(model, p, max_new_tokens), None)
    tokens, forwards, seconds, ar_out, _ = measure(ar, prompts, device)
    ar_speed = tokens / seconds
    rows = [("AR", None, (tokens, forwards, seconds, ar_out, 0))]
    for rule in ("lossless", "paper"):
        for beta in (1.0, 0.5, 0.0):
            decode = lambda p: generate_tidar(model, p, max_new_tokens, k, beta=beta, rule=rule)
            rows.append((rule, beta, measure(decode, prompts, device)))
    for rule, beta, (n, f, s, outs, _) in rows:
        share, loglik = ar_judgement(model, prompts, outs)
        print(f"{rule:>9} {'' if beta is None else beta:>5} {n / f:8.2f} {n / s:9.1f} "
              f"{n / s / ar_speed:6.2f}x {100 * share:13.1f}% {loglik:17.3f} {str(outs == ar_out):>5}")
    print("paper (TiDAR 1.5B, its released rule with beta = 0): 7.45 tokens per forward, 4.71x AR tokens/s; "
          "8B: 8.25 and 5.91x")


def table_blocks(block_models, draft_lens, prompts, max_new_tokens, device):
    print("\n2. tokens per forward: block length B in training (rows) against draft length k in decoding "
          "(columns)")
    print(f"{'B':>4}" + "".join(f" {'k=' + str(k):>7}" for k in draft_lens))
    for model in block_models:
        row = []
        for k in draft_lens:
            n, f, *_ = measure(lambda p: generate_tidar(model, p, max_new_tokens, k), prompts, device)
            row.append(n / f)
        print(f"{model.config.block_len:4d}" + "".join(f" {r:7.2f}" for r in row))
    print("paper (TiDAR 1.5B, its Figure 5 / Table 4, k = B): B = 4: 3.51, 8: 5.69, 16: 7.35 tokens per "
          "forward")


@torch.no_grad()
def generate_speculative(target, drafter, prompt_ids, max_new_tokens, draft_len=4, temperature=0.0,
                         top_k=None, generator=None, capture=True):
    """
    Classic speculative decoding (Leviathan et al., 2023), the baseline the paper compares TiDAR with: a
    separate small AR model proposes d_1 .. d_k one forward at a time, and the target verifies d_0 .. d_k
    in one causal forward, with sample.py's verify and cache; lossless like TiDAR with beta = 1.
    Returns what generate_tidar returns; stats["drafter_forwards"] counts the drafter's forwards.
    """
    config, k = target.config, draft_len
    if drafter.config.vocab_size != config.vocab_size:
        raise ValueError(f"the drafter's vocabulary ({drafter.config.vocab_size}) is not the target's "
                         f"({config.vocab_size}): train it on the same data")
    prompts, one = sample.as_batch(prompt_ids, config.eot_id)
    for model in (target, drafter):
        check_request(model.config, prompts, max_new_tokens, temperature, top_k, k + 1, k)
    N = len(prompts)
    cache, last = sample.new_cache(target, prompts, max_new_tokens, k + 1)
    small, _ = sample.new_cache(drafter, prompts, max_new_tokens, k + 1)  # the drafter's own cache
    draw = sample.uniforms(N, 2 * k + 1, temperature, generator, cache.device)
    rows, offsets = torch.arange(N, device=cache.device), torch.arange(k + 1, device=cache.device)
    logits, _ = sample.prefill(target, prompts, 0, cache)  # (N, V)
    sample.prefill(drafter, prompts, 0, small)
    d0, _ = sample.choose(logits, temperature, top_k, draw()[:, 0])  # (N,)
    c = torch.tensor([prompt[-1] for prompt in prompts], device=cache.device)  # (N,): last committed token

    def step(u):  # u (N, 2k+1): the step's uniforms
        L = cache.length  # (N,), the cache's own tensor: read it before the commit in 4 changes it
        # 1. Draft: the drafter reads the last committed token again (its cache is rolled back to just before
        #    it, which is all the bookkeeping it needs) and d_0, then proposes d_1 .. d_k, one forward each.
        small.length.copy_(L - 1)
        tokens, drafts, qs = torch.stack([c, d0], dim=1), [], []  # (N, 2)
        for j in range(k):
            Ls, t = small.length, tokens.size(1)
            mask = causal_mask(t, Ls, small.max_len, cache.device)
            logits = drafter(tokens, Ls[:, None] + offsets[:t], mask, small)
            small.length.copy_(Ls + t)
            token, q = sample.choose(logits[:, -1], temperature, top_k, u[:, k + 1 + j])  # (N,), (N, V)
            tokens = token[:, None]
            drafts.append(token)
            qs.append(q)
        drafts, q = torch.stack(drafts, dim=1), torch.stack(qs, dim=1)  # (N, k), (N, k, V)
        #    The target reads d_0 .. d_k in one causal forward: its output after d_j is for position L+j+1.
        d = torch.cat([d0[:, None], drafts], dim=1)  # (N, k+1)
        logits = target(d, L[:, None] + offsets, causal_mask(k + 1, L, cache.max_len, cache.device), cache)

        # 2. Verify d_1 .. d_k and 3. decide y, exactly as TiDAR does.
        n, y = sample.verify(sample.probabilities(logits, temperature, top_k), q, drafts, u[:, : k + 1])
        # 4. Commit d_0 .. d_n, roll back the rest. 5. Next: d_0 = y, after the last committed token d_n.
        cache.length.copy_(torch.minimum(L + n + 1, last))
        c.copy_(d[rows, n])
        d0.copy_(y)
        return d, n, y

    out, traces = sample.run(step, d0, draw, max_new_tokens, config.eot_id, capture)
    stats = [dict(forwards=1 + len(t), drafter_forwards=1 + k * len(t), committed=[n + 1 for _, n, _ in t],
                  trace=t) for t in traces]
    return (out[0], stats[0]) if one else (out, stats)


def table_speculative(model, drafter, speculative_lens, prompts, max_new_tokens, device):
    k = model.config.block_len
    n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"\n3. TiDAR (k = {k}, {n_params(model):.2f}M parameters) against speculative decoding with a "
          f"{n_params(drafter):.2f}M-parameter AR drafter")
    print(f"{'method':>18} {'tok/fwd':>8} {'drafter fwd/fwd':>16} {'ms/fwd':>7} {'tok/s':>9} {'vs AR':>7} "
          f"{'= AR':>5}")
    n, f, s, ar_out, _ = measure(lambda p: (generate_ar(model, p, max_new_tokens), None), prompts, device)
    ar_speed, rows = n / s, {"AR": (n, f, s, ar_out, 0)}
    rows[f"TiDAR k={k}"] = measure(lambda p: generate_tidar(model, p, max_new_tokens, k), prompts, device)
    for j in speculative_lens:
        decode = lambda p: generate_speculative(model, drafter, p, max_new_tokens, draft_len=j)
        rows[f"speculative k={j}"] = measure(decode, prompts, device)
    for name, (n, f, s, outs, drafter_f) in rows.items():  # f: the target's forwards, prefills included
        print(f"{name:>18} {n / f:8.2f} {drafter_f / f:16.1f} {1e3 * s / f:7.2f} {n / s:9.1f} "
              f"{n / s / ar_speed:6.2f}x {str(outs == ar_out):>5}")
    print("paper (its Figure 4): EAGLE-3, a trained one-layer drafter, 3.49 to 4.37 tokens per forward; "
          "TiDAR 1.5B 7.45, 8B 8.25")


def recipe(out_dir):
    """How the checkpoint in out_dir was trained, in a few words, from what train.py records in it."""
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    config, start, name = ckpt["train_config"], ckpt.get("started_from"), {"tidar": "TiDAR", "ar": "AR"}
    # the AR steps of a one-run recipe
    ar = min(config.get("ar_iters", 0), ckpt["iter_num"]) if config["objective"] == "tidar" else 0
    steps = (f"AR {ar} + " if ar else "") + f"{name[config['objective']]} {ckpt['iter_num'] - ar}"
    return (f"{name[start['objective']]} {start['iter_num']} + " if start else "") + steps, config


def val_losses(model, data_dir, n_windows, device):
    """Val AR loss, diffusion loss and draft accuracy by offset (B,), on n_windows windows spread evenly over
    the val split (the same for every model)."""
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    S = model.config.seq_len
    starts = np.linspace(0, len(val) - S - 1, n_windows).astype(np.int64)
    windows = torch.from_numpy(np.stack([val[i : i + S + 1] for i in starts]).astype(np.int64)).to(device)
    ar = diff = 0.0
    hits = torch.zeros(model.config.block_len)
    for x in windows.split(8):
        a, d, h = evaluate_batch(model, model.config, x[:, :-1], x[:, 1:])
        ar, diff, hits = ar + a * len(x), diff + d * len(x), hits + h * len(x)
    return ar / n_windows, diff / n_windows, hits / n_windows


def table_recipes(recipe_dirs, ar_dir, models, draft_lens, prompts, max_new_tokens, data_dir, n_windows,
                  device):
    print(f"\n4. how the model is made: val losses on {n_windows} val windows; tokens per forward and speed "
          "against AR (the same model) on the prompts")
    print(f"{'checkpoint':>16} {'steps':>17} {'alpha':>5} {'B':>3} {'lr':>7} {'val AR':>7} {'diff':>6}"
          + "".join(f" {'k=' + str(k):>12}" for k in draft_lens))
    accuracy = {}
    for out_dir in recipe_dirs + ([ar_dir] if ar_dir else []):
        model, name = models[out_dir], os.path.basename(os.path.normpath(out_dir))
        steps, config = recipe(out_dir)
        ar, diff, hits = val_losses(model, data_dir, n_windows, device)
        cells = ""
        if out_dir != ar_dir:
            accuracy[name] = " ".join(f"{100 * a:.0f}" for a in hits.tolist())
            ar_decode = lambda p: (generate_ar(model, p, max_new_tokens), None)
            n, f, s, ar_out, _ = measure(ar_decode, prompts, device)
            for k in draft_lens:
                decode = lambda p: generate_tidar(model, p, max_new_tokens, k)
                n_k, f_k, s_k, outs, _ = measure(decode, prompts, device)
                cells += f" {n_k / f_k:5.2f} {(n_k / s_k) / (n / s):5.2f}x" + ("" if outs == ar_out else "!")
        diff = f"{diff:6.3f}" if out_dir != ar_dir else "-"
        print(f"{name:>16} {steps:>17} {config['alpha']:5.2g} {model.config.block_len:3d} "
              f"{config['lr']:7.1e} {ar:7.3f} {diff:>6}{cells}")
    print("(per k: tokens per forward, then tokens/s against AR; '!' marks outputs that differ from AR's)")
    for name, acc in accuracy.items():
        print(f"draft accuracy % by offset, {name}: {acc}")
    print("paper: TiDAR 1.5B and 8B are continual pretraining of Qwen2.5 1.5B and Qwen3 8B, never trained "
          "from scratch")


def side_forward(model, seq, groups):
    """
    One forward of seq (causal) and, beside it, each group (t, tokens): its tokens at positions t, t+1, ...,
    seeing seq[:t] and their own group; a group of [MASK]s both ways (a block after seq[:t], as in decoding),
    any other causally (a path that branches off seq after seq[:t]). No group sees another. Returns each
    group's logits.
    """
    T, device = len(seq), next(model.parameters()).device
    tokens = torch.tensor([tok for _, g in groups for tok in g], device=device)
    start = torch.tensor([t for t, g in groups for _ in g], device=device)
    group = torch.tensor([i for i, (_, g) in enumerate(groups) for _ in g], device=device)
    depth = torch.cat([torch.arange(len(g), device=device) for _, g in groups])
    i = torch.arange(T, device=device)
    # a [MASK] sees its whole group, a path token those before it
    block = (tokens == model.config.mask_id)[:, None]
    own = (group[:, None] == group[None, :]) & (block | (depth <= depth[:, None]))
    # (group tokens, keys): seq[:t], then their own group
    seen = torch.cat([i[None, :] < start[:, None], own], 1)
    hidden = torch.zeros(T, len(tokens), dtype=torch.bool, device=device)  # seq sees no group
    mask = torch.cat([torch.cat([causal_mask(T, device=device), hidden], 1), seen])
    idx = torch.cat([torch.tensor(seq, device=device), tokens])[None]
    logits = model(idx, torch.cat([i, start + depth]), mask)[0, T:]
    return logits.split([len(g) for _, g in groups])


def chunks(groups, size=1024):
    """groups in runs of about `size` tokens for side_forward: a mask grows with the square of its queries."""
    run, n = [], 0
    for g in groups:
        run, n = run + [g], n + len(g[1])
        if n >= size:
            yield run
            run, n = [], 0
    if run:
        yield run


@torch.no_grad()
def diffusion_drafts(model, seq, starts, k):
    """The drafts of a block of k [MASK]s after seq[:t], for each t: {t: argmax of slots 0 .. k-1}."""
    groups = [(t, [model.config.mask_id] * k) for t in starts]
    logits = [lg for run in chunks(groups) for lg in side_forward(model, seq, run)]
    return {t: lg.argmax(-1).tolist() for t, lg in zip(starts, logits)}


@torch.no_grad()
def marginal_drafts(model, seq, starts, k, beam=64):
    """
    For each t, the token the AR model finds most likely at positions t+1 .. t+k-1 given seq[:t] alone, its
    probability summed over the tokens in between (a beam of the `beam` most likely paths to each depth):
    the drafts of a one-step diffusion whose slot j had learned exactly this AR model's distribution of the
    token j places past the context (the diffusion loss's target, with the AR model standing in for the
    data). Returns {t: [None, d_1 .. d_{k-1}]} and the probability the beam held at each offset, averaged.
    """
    device = next(model.parameters()).device
    # causal[t - 1]: for the token at t, given seq[:t]
    causal = model(torch.tensor([seq], device=device), torch.arange(len(seq), device=device),
                   causal_mask(len(seq), device=device))[0]
    joint = {t: torch.softmax(causal[t - 1], -1)[None] for t in starts}  # (paths, V): each path, then a token
    paths = {t: torch.zeros(1, 0, dtype=torch.long, device=device) for t in starts}  # (paths, j): tokens
    drafts, held = {t: [None] for t in starts}, []
    for j in range(1, k):
        prob = {}
        for t in starts:  # keep the `beam` most likely paths to position t + j - 1
            top, V = joint[t].flatten().topk(min(beam, joint[t].numel())), joint[t].size(1)
            paths[t] = torch.cat([paths[t][top.indices // V], (top.indices % V)[:, None]], 1)
            prob[t] = top.values
        held.append(np.mean([prob[t].sum().item() for t in starts]))
        groups = [(t, path.tolist()) for t in starts for path in paths[t]]
        logits = torch.cat([lg[-1:] for run in chunks(groups) for lg in side_forward(model, seq, run)])
        for t, after in zip(starts, torch.softmax(logits, -1).split([len(paths[t]) for t in starts])):
            joint[t] = prob[t][:, None] * after  # after: the token at t + j, after each path
            drafts[t].append(joint[t].sum(0).argmax().item())
    return drafts, held


def agreement(seq, P, drafts, k):
    """(k-1,): at each offset j = 1 .. k-1, how many of the blocks after seq[:t], t >= P, drafted seq[t + j],
    the greedy token there (seq[P:] is the AR model's greedy text)."""
    return np.sum([[t + j < len(seq) and drafts[t][j] == seq[t + j] for j in range(1, k)]
                   for t in range(P, len(seq))], 0)


def forwards_needed(seq, P, drafts, k):
    """
    Lossless greedy TiDAR's forwards to commit seq[P:], the AR model's greedy text, with the drafts given: the
    prefill decides seq[P]; a step with d_0 at L accepts drafts[L][j] while it is seq[L + j], and decides one
    more token (README, "Decoding: one forward per step").
    """
    forwards, L = 1, P
    while L < len(seq) - 1:
        n = 0
        while n + 1 < k and L + n + 1 < len(seq) and drafts[L][n + 1] == seq[L + n + 1]:
            n += 1
        forwards, L = forwards + 1, L + n + 1
    return forwards


def table_target(model, k, prompts, max_new_tokens):
    print(f"\n5. the drafts' target, k = {k}: how often each offset's draft is the AR model's greedy token, "
          "for the one-step diffusion's drafts and for the argmax of the AR model's own marginals (the "
          "diffusion's target)")
    agree, forwards, tokens, positions, held = {}, {}, 0, np.zeros(k - 1), []
    for p in prompts:
        seq = p + generate_ar(model, p, max_new_tokens)  # what lossless greedy TiDAR commits
        starts = range(len(p), len(seq))  # every place a block can start
        ideal, h = marginal_drafts(model, seq, starts, k)
        held.append(h)
        tokens += len(seq) - len(p)
        positions += [max(0, len(seq) - len(p) - j) for j in range(1, k)]  # blocks with a token at offset j
        for name, drafts in (("diffusion", diffusion_drafts(model, seq, starts, k)), ("AR marginals", ideal)):
            agree[name] = agree.get(name, 0) + agreement(seq, len(p), drafts, k)
            forwards[name] = forwards.get(name, 0) + forwards_needed(seq, len(p), drafts, k)
    decoded = sum(generate_tidar(model, p, max_new_tokens, k)[1]["forwards"] for p in prompts)
    print(f"{'drafts':>13}" + "".join(f" {'offset ' + str(j):>9}" for j in range(1, k)) + f" {'tok/fwd':>8}")
    for name in agree:
        print(f"{name:>13}" + "".join(f" {a:8.0%}" for a in agree[name] / positions)
              + f" {tokens / forwards[name]:8.2f}")
    print(f"(the beam held {', '.join(f'{h:.0%}' for h in np.mean(held, 0))} of the probability at offsets "
          f"1 .. {k - 1}; generate_tidar itself: {tokens / decoded:.2f} tokens per forward)")


def table_targets(target_dirs, models, draft_lens, prompts, max_new_tokens, data_dir, n_windows, temperature,
                  device):
    longest = max(draft_lens)  # the agreement's offsets: 1 .. longest - 1
    print(f"\n6. the masks' target (rollouts.py --rollout: the data's tokens, the model's own greedy "
          f"rollouts, or a mix): val AR loss on {n_windows} val windows; tokens per forward and speed "
          f"against AR (the same model, decoded the same way) on the prompts, greedy and sampled at "
          f"T = {temperature}")
    print(f"{'checkpoint':>16} {'steps':>22} {'rollout':>7} {'val AR':>7} {'T':>4}"
          + "".join(f" {'k=' + str(k):>12}" for k in draft_lens))
    agree = {}
    for out_dir in target_dirs:
        model, name = models[out_dir], os.path.basename(os.path.normpath(out_dir))
        steps, config = recipe(out_dir)
        ar = val_losses(model, data_dir, n_windows, device)[0]
        for temp in (0.0, temperature):  # a fresh generator per prompt: every run draws the same uniforms
            seeded = lambda: torch.Generator(device).manual_seed(0)
            ar_decode = lambda p: (generate_ar(model, p, max_new_tokens, temp, generator=seeded()), None)
            n, f, s, ar_out, _ = measure(ar_decode, prompts, device)
            if not temp:
                greedy = ar_out
            cells = ""
            for k in draft_lens:
                decode = lambda p: generate_tidar(model, p, max_new_tokens, k, temp, generator=seeded())
                n_k, f_k, s_k, outs, _ = measure(decode, prompts, device)
                lossless = temp or outs == ar_out
                cells += f" {n_k / f_k:5.2f} {(n_k / s_k) / (n / s):5.2f}x" + ("" if lossless else "!")
            print(f"{name:>16} {steps:>22} {config.get('rollout', 0.0):7.2g} {ar:7.3f} {temp:4.2g}{cells}")
        hits = positions = 0  # table 5's agreement, on the greedy texts
        for p, out in zip(prompts, greedy):
            seq, starts = p + out, range(len(p), len(p) + len(out))
            drafts = diffusion_drafts(model, seq, starts, longest)
            hits = hits + agreement(seq, len(p), drafts, longest)
            positions = positions + np.array([max(0, len(out) - j) for j in range(1, longest)])
        agree[name] = " ".join(f"{h:.0%}" for h in hits / positions)
    print("(per k: tokens per forward, then tokens/s against AR; '!' marks greedy outputs that differ from "
          "AR's)")
    for name, a in agree.items():
        print(f"drafts that are the greedy token, by offset 1 .. {longest - 1}, {name}: {a}")


def main(args):
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        fail(str(e), 2)
    tables = set(integers(args.tables, "tables"))
    draft_lens = integers(args.draft_lens, "draft_lens")
    speculative_lens = integers(args.speculative_lens, "speculative_lens")
    for name in ("num_prompts", "prompt_len", "max_new_tokens", "val_windows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name}={getattr(args, name)}: must be at least 1", 2)
    block_dirs, recipe_dirs, target_dirs = ([d for d in ds.split(",") if d] for ds in (
        args.block_dirs, args.recipe_dirs, args.target_dirs))
    # the TiDAR models each table decodes: 1, 3, 5 the one in out_dir; 2, 4, 6 block_, recipe_, target_dirs'
    decoded = [args.out_dir] * bool(tables & {1, 3, 5}) + block_dirs * (2 in tables)
    decoded += recipe_dirs * (4 in tables) + target_dirs * (6 in tables)
    others = [args.drafter_dir] * (3 in tables) + [args.ar_dir] * (4 in tables and bool(recipe_dirs))
    models, enc = {}, None
    for d in decoded + others:
        if d and d not in models:
            models[d], enc = load_model(d, args.device)
    if not decoded:
        fail(f"--tables={args.tables}: nothing to compare; tables 2, 4 and 6 need --block_dirs, "
             "--recipe_dirs and --target_dirs", 2)
    tidar_models = [models[d] for d in decoded]
    drafter = models.get(args.drafter_dir) if 3 in tables and args.drafter_dir else None
    room = 2 * max(draft_lens + [m.config.block_len for m in tidar_models])
    seq_len = min(m.config.seq_len for m in tidar_models + [drafter] if m is not None)
    if args.max_new_tokens is None:
        args.max_new_tokens = max(1, min(256, seq_len - args.prompt_len - room))
    for m in tidar_models:
        check_fits(m.config, args.prompt_len, args.max_new_tokens, 2 * max(draft_lens + [m.config.block_len]))
    if drafter is not None:
        # speculative decoding reaches k + 1 positions past the last token
        for m in (models[args.out_dir], drafter):
            check_fits(m.config, args.prompt_len, args.max_new_tokens, max(speculative_lens) + 1)
        if drafter.config.vocab_size != models[args.out_dir].config.vocab_size:
            fail(f"the drafter in {args.drafter_dir} has another vocabulary: train it on {args.out_dir}'s "
                 "data")
    prompts = held_out_prompts(args, args.num_prompts, enc)
    cpu = f"{args.device} (threads: {torch.get_num_threads()})"
    where = args.data_dir + "'s val split" if args.prompts == "val" else args.prompts
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu
    print(f"device: {device}, torch {torch.__version__}; {len(prompts)} prompts of {args.prompt_len} tokens "
          f"from {where}, up to {args.max_new_tokens} new tokens; eager on the CPU, steps replayed from CUDA "
          "graphs on CUDA")
    if 1 in tables:
        table_rules(models[args.out_dir], prompts, args.max_new_tokens, args.device)
    if 2 in tables and block_dirs:
        table_blocks([models[d] for d in block_dirs], draft_lens, prompts, args.max_new_tokens, args.device)
    if drafter is not None:
        table_speculative(models[args.out_dir], drafter, speculative_lens, prompts, args.max_new_tokens,
                          args.device)
    if 4 in tables and recipe_dirs:
        table_recipes(recipe_dirs, args.ar_dir, models, draft_lens, prompts, args.max_new_tokens,
                      args.data_dir, args.val_windows, args.device)
    if 5 in tables:
        table_target(models[args.out_dir], min(draft_lens), prompts, args.max_new_tokens)
    if 6 in tables and target_dirs:
        table_targets(target_dirs, models, draft_lens, prompts, args.max_new_tokens, args.data_dir,
                      args.val_windows, args.temperature, args.device)


if __name__ == "__main__":
    main(parser.parse_args())
