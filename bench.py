"""
Measures what the README's results section reports, in one run, at batch 1 on one device:
  1. decoding: AR and TiDAR tokens/s, tokens per forward and their ratio, greedy, on held-out prompts
     from the val split, for several draft lengths; and whether the outputs were identical
  2. free token slots (the paper's Figure 1 for this model): forward latency against the number of
     query tokens, with a KV cache of a few hundred tokens; where k + k*k falls
  3. training: ms/iter of the TiDAR objective against the AR objective, same context and batch

    python bench.py                       # the checkpoint in out/, prompts from data/pystdlib/val.bin
    python bench.py --draft_lens=4,8,16 --num_prompts=8 --max_new_tokens=256
"""
import argparse
import os
import time
from contextlib import nullcontext

import numpy as np
import torch

from sample import fail, generate_ar, generate_tidar, load_checkpoint
from tidar import KVCache, ar_inputs, causal_mask, pick_device, tidar_inputs, tidar_loss

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--out_dir", default="out", help="folder with ckpt.pt")
parser.add_argument("--data_dir", default="data/pystdlib", help="folder with val.bin, for the prompts")
parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
parser.add_argument("--draft_lens", default="4,8,16", help="comma-separated draft lengths k")
parser.add_argument("--num_prompts", type=int, default=8)
parser.add_argument("--prompt_len", type=int, default=64)
parser.add_argument("--max_new_tokens", type=int, default=256)
parser.add_argument("--cache_len", type=int, default=256, help="KV cache length for the query-length sweep")
parser.add_argument("--max_queries", type=int, default=512, help="largest query count in the sweep")
parser.add_argument("--train_batch", type=int, default=16, help="batch size for the training timing")
parser.add_argument("--repeats", type=int, default=10, help="timed repeats per forward / training step")


def timed(fn, device, repeats=1):
    """Mean seconds per call of fn, after one warm-up call."""
    fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    sync()
    return (time.perf_counter() - t0) / repeats, result


def bench_decoding(model, prompts, draft_lens, max_new_tokens, device):
    print(f"\n1. decoding, greedy, batch 1, {len(prompts)} prompts of {len(prompts[0])} tokens, "
          f"up to {max_new_tokens} new tokens")
    print(f"{'method':>10} {'tokens':>7} {'forwards':>9} {'tok/fwd':>8} {'tok/s':>9} {'vs AR':>7}  identical")
    ar_seconds, ar_outs = 0.0, []
    for p in prompts:
        seconds, out = timed(lambda: generate_ar(model, p, max_new_tokens), device)
        ar_seconds, ar_outs = ar_seconds + seconds, ar_outs + [out]
    n_ar = sum(map(len, ar_outs))
    print(f"{'AR':>10} {n_ar:7d} {n_ar:9d} {1:8.2f} {n_ar / ar_seconds:9.1f} {1:7.2f}x")
    for k in draft_lens:
        seconds, tokens, forwards, identical = 0.0, 0, 0, True
        for p, ar_out in zip(prompts, ar_outs):
            s, (out, stats) = timed(lambda: generate_tidar(model, p, max_new_tokens, draft_len=k), device)
            seconds, tokens, forwards = seconds + s, tokens + len(out), forwards + stats["forwards"]
            identical &= out == ar_out
        speedup = (tokens / seconds) / (n_ar / ar_seconds)
        print(f"{f'TiDAR k={k}':>10} {tokens:7d} {forwards:9d} {tokens / forwards:8.2f} {tokens / seconds:9.1f} "
              f"{speedup:7.2f}x  {identical}")


def bench_query_sweep(model, cache_len, max_queries, draft_lens, repeats, device):
    # A forward's cost hardly grows with its query count until the GPU is compute-bound: the slots below
    # that point are free, and TiDAR spends them on k + k*k queries per step (the paper's Figure 1).
    config, dtype = model.config, next(model.parameters()).dtype
    print(f"\n2. forward latency against query tokens, KV cache of {cache_len} tokens")
    cache = KVCache(config, cache_len, device=device, dtype=dtype)
    tokens = torch.randint(0, config.vocab_size, (1, cache_len + max_queries), device=device)
    with torch.no_grad():
        prefix, pos = tokens[:, :cache_len], torch.arange(cache_len, device=device)
        model(prefix, pos, causal_mask(cache_len, device=device), cache, n_causal=cache_len)
    marks = {k + k * k: k for k in draft_lens}
    sizes = sorted({2**i for i in range(max_queries.bit_length()) if 2**i <= max_queries} | set(marks))
    base = None
    print(f"{'queries':>8} {'ms':>8} {'vs 1':>6}")
    for T in sizes:
        if cache_len + T > config.seq_len:
            print(f"{T:8d}   (beyond the model's context of {config.seq_len})")
            continue
        idx, pos = tokens[:, cache_len : cache_len + T], torch.arange(cache_len, cache_len + T, device=device)
        mask = causal_mask(T, cache_len, device=device)
        with torch.no_grad():  # n_causal = 0: nothing is written, the cache stays as it is
            seconds, _ = timed(lambda: model(idx, pos, mask, cache, n_causal=0), device, repeats)
        base = base or seconds
        mark = f"  <- k + k*k for k = {marks[T]}" if T in marks else ""
        print(f"{T:8d} {seconds * 1e3:8.3f} {seconds / base:6.2f}{mark}")


def bench_training(model, batch, repeats, device):
    config = model.config
    S = config.seq_len
    print(f"\n3. training step (forward, backward, AdamW), batch {batch}, S = {S}, B = {config.block_len}")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randint(0, config.vocab_size, (batch, S + 1), device=device)
    x, y = data[:, :-1], data[:, 1:]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()

    def step(objective):
        with autocast:
            if objective == "tidar":
                loss = tidar_loss(model(*tidar_inputs(x, config.block_len, config.mask_id)), x, y)[0]
            else:
                loss = torch.nn.functional.cross_entropy(model(*ar_inputs(x)).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ms = {obj: 1e3 * timed(lambda: step(obj), device, repeats)[0] for obj in ("ar", "tidar")}
    print(f"AR {ms['ar']:.1f} ms/iter, TiDAR {ms['tidar']:.1f} ms/iter (doubled sequence): "
          f"{ms['tidar'] / ms['ar']:.2f}x")


def main(args):
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        fail(str(e))
    model, _ = load_checkpoint(args.out_dir, args.device)
    draft_lens = [int(k) for k in args.draft_lens.split(",")]
    val = np.memmap(os.path.join(args.data_dir, "val.bin"), dtype=np.uint16, mode="r")
    starts = np.linspace(0, len(val) - args.prompt_len - 1, args.num_prompts).astype(np.int64)  # fixed, spread out
    prompts = [val[s : s + args.prompt_len].astype(np.int64).tolist() for s in starts]
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {name}, torch {torch.__version__}, model: {n_params / 1e6:.2f}M parameters, {model.config}")
    bench_decoding(model, prompts, draft_lens, args.max_new_tokens, args.device)
    bench_query_sweep(model, args.cache_len, args.max_queries, draft_lens, args.repeats, args.device)
    bench_training(model, args.train_batch, args.repeats, args.device)


if __name__ == "__main__":
    main(parser.parse_args())
