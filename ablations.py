"""
The paper in miniature (README, "The paper in miniature"): TiDAR's ablations at a size one GPU or a laptop
can run, each table printed beside the paper's numbers. Greedy, batch 1, held-out prompts of the val split.
  1. the decoding rule: this project's lossless rule against the authors' released one (slot 0 of each
     block committed unverified), at beta = 1, 0.5 and 0; what trusting the drafts costs in quality
  2. the block length B of training against the draft length k of decoding (the paper's Figure 5 / Table 4)
  3. TiDAR against classic speculative decoding with a small separate drafter (the paper's Figure 4)

    python ablations.py --out_dir=out --block_dirs=out-b4,out,out-b16 --drafter_dir=out-drafter
The README's section trains the models it needs with train.py.
"""
import argparse

import torch
import torch.nn.functional as F

from bench import check_fits, val_prompts
from sample import fail, generate_ar, generate_speculative, generate_tidar, load_checkpoint, timed
from tidar import causal_mask, pick_device

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--out_dir", default="out", help="the TiDAR checkpoint of tables 1 and 3")
parser.add_argument("--block_dirs", default="", help="comma-separated TiDAR checkpoints trained with different B")
parser.add_argument("--drafter_dir", default="", help="a small AR checkpoint (--objective=ar) on the same data")
parser.add_argument("--data_dir", default="data/pycode", help="folder with val.bin, for the prompts")
parser.add_argument("--draft_lens", default="4,8,16", help="k for table 2")
parser.add_argument("--speculative_lens", default="2,4,8", help="drafter proposals per step for table 3")
parser.add_argument("--num_prompts", type=int, default=8)
parser.add_argument("--prompt_len", type=int, default=64)
parser.add_argument("--max_new_tokens", type=int, default=None, help="default: 256, or what every context leaves")
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
        logits = model(seq, torch.arange(seq.size(1), device=seq.device), causal_mask(seq.size(1), device=seq.device))
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
        print(f"{rule:>9} {'' if beta is None else beta:>5} {n / f:8.2f} {n / s:9.1f} {n / s / ar_speed:6.2f}x "
              f"{100 * share:13.1f}% {loglik:17.3f} {str(outs == ar_out):>5}")
    print("paper (TiDAR 1.5B, its released rule with beta = 0): 7.45 tokens per forward, 4.71x AR tokens/s; "
          "8B: 8.25 and 5.91x")


def table_blocks(block_models, draft_lens, prompts, max_new_tokens, device):
    print("\n2. tokens per forward: block length B in training (rows) against draft length k in decoding (columns)")
    print(f"{'B':>4}" + "".join(f" {'k=' + str(k):>7}" for k in draft_lens))
    for model in block_models:
        row = []
        for k in draft_lens:
            n, f, *_ = measure(lambda p: generate_tidar(model, p, max_new_tokens, k), prompts, device)
            row.append(n / f)
        print(f"{model.config.block_len:4d}" + "".join(f" {r:7.2f}" for r in row))
    print("paper (TiDAR 1.5B, its Figure 5 / Table 4, k = B): B = 4: 3.51, 8: 5.69, 16: 7.35 tokens per forward")


def table_speculative(model, drafter, speculative_lens, prompts, max_new_tokens, device):
    k = model.config.block_len
    n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"\n3. TiDAR (k = {k}, {n_params(model):.2f}M parameters) against speculative decoding with a "
          f"{n_params(drafter):.2f}M-parameter AR drafter")
    print(f"{'method':>18} {'tok/fwd':>8} {'drafter fwd/fwd':>16} {'ms/fwd':>7} {'tok/s':>9} {'vs AR':>7} {'= AR':>5}")
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


def main(args):
    try:
        args.device = pick_device(args.device)
        draft_lens = [int(k) for k in args.draft_lens.split(",")]
        speculative_lens = [int(k) for k in args.speculative_lens.split(",")]
    except ValueError as e:
        fail(str(e) if "--device" in str(e) else "--draft_lens and --speculative_lens take comma-separated integers")
    model, _ = load_checkpoint(args.out_dir, args.device)
    block_models = [load_checkpoint(d, args.device)[0] for d in args.block_dirs.split(",") if d]
    drafter = load_checkpoint(args.drafter_dir, args.device)[0] if args.drafter_dir else None
    room = 2 * max(draft_lens + [m.config.block_len for m in [model] + block_models])
    seq_len = min(m.config.seq_len for m in [model] + block_models + [drafter] if m is not None)
    args.max_new_tokens = args.max_new_tokens or max(1, min(256, seq_len - args.prompt_len - room))
    for m in [model] + block_models:
        check_fits(m.config, args.prompt_len, args.max_new_tokens, 2 * max(draft_lens + [m.config.block_len]))
    if drafter is not None:
        for m in (model, drafter):  # speculative decoding reaches k + 1 positions past the last token
            check_fits(m.config, args.prompt_len, args.max_new_tokens, max(speculative_lens) + 1)
        if drafter.config.vocab_size != model.config.vocab_size:
            fail(f"the drafter in {args.drafter_dir} has another vocabulary: train it on {args.out_dir}'s data")
    prompts = val_prompts(args.data_dir, args.num_prompts, args.prompt_len, model.config)
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"device: {name}, torch {torch.__version__}; {len(prompts)} prompts of {args.prompt_len} tokens, "
          f"up to {args.max_new_tokens} new tokens; eager on the CPU, steps replayed from CUDA graphs on CUDA")
    table_rules(model, prompts, args.max_new_tokens, args.device)
    if block_models:
        table_blocks(block_models, draft_lens, prompts, args.max_new_tokens, args.device)
    if drafter is not None:
        table_speculative(model, drafter, speculative_lens, prompts, args.max_new_tokens, args.device)


if __name__ == "__main__":
    main(parser.parse_args())
