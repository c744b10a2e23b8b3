"""
Measures what the README's results section reports, in one run on one device:
  1. decoding at batch 1: AR and TiDAR tokens/s, tokens per forward and their ratio, greedy, on held-out
     prompts from the val split, for several draft lengths; eager (Python launches every kernel) and, on
     CUDA, replayed from CUDA graphs; in each dtype; and whether TiDAR's outputs were identical to AR's
  2. batches: total tokens/s of AR and TiDAR for batches of 1, 2, 4, ... prompts decoded together, and
     up to which batch TiDAR beats AR
  3. free token slots (the paper's Figure 1 for this model): forward latency against the number of query
     tokens, with a KV cache of up to 256 tokens; where k + k*k falls
  4. training: ms/iter of the TiDAR objective against the AR objective, same context and batch

    python bench.py                       # the checkpoint in out/, prompts from data/pycode/val.bin
    python bench.py --num_prompts=16      # the README's GPU results
"""
import argparse
import copy
import os
from contextlib import nullcontext

import numpy as np
import torch

from sample import GRAPHS, cuda_graph, fail, generate_ar, generate_tidar, load_checkpoint, timed
from tidar import KVCache, causal_mask, pick_device, training_loss

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--out_dir", default="out", help="folder with ckpt.pt")
parser.add_argument("--data_dir", default="data/pycode", help="folder with val.bin, for the prompts")
parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
parser.add_argument("--draft_lens", default="4,8,16", help="comma-separated draft lengths k")
parser.add_argument("--dtypes", default=None, help="comma-separated; default float32,bfloat16 on CUDA, else float32")
parser.add_argument("--num_prompts", type=int, default=8, help="prompts decoded one at a time in section 1")
parser.add_argument("--batches", default=None, help="batch sizes of section 2; default 1,2,4,...,64 on CUDA, "
                    "1,2,4,8 elsewhere")
parser.add_argument("--prompt_len", type=int, default=64)
parser.add_argument("--max_new_tokens", type=int, default=None, help="default: 256, or what the context leaves")
parser.add_argument("--cache_len", type=int, default=None, help="KV cache length for the query-length sweep; "
                    "default: 256, or half the model's context")
parser.add_argument("--max_queries", type=int, default=512, help="largest query count in the sweep")
parser.add_argument("--train_batch", type=int, default=16, help="batch size for the training timing")
parser.add_argument("--repeats", type=int, default=20, help="timed repeats per forward / training step")


def decode_all(model, batches, draft_lens, max_new_tokens, device, capture):
    """
    Each batch of prompts decoded by AR and by TiDAR at each k, every method in turn (a drift in the
    machine's speed hits them all alike). Returns per method: seconds, new tokens, forwards per row
    summed (AR: one per token), and the outputs.
    """
    decoders = {"AR": lambda b: (generate_ar(model, b, max_new_tokens, capture=capture), None)}
    for k in draft_lens:
        decoders[f"TiDAR k={k}"] = lambda b, k=k: generate_tidar(model, b, max_new_tokens, k, capture=capture)
    for decode in decoders.values():  # warm-up: first calls pay for kernel selection, allocation and, captured,
        decode(batches[0])  # for recording the step's graph, which the later calls (same shapes) replay
    results = {name: [0.0, 0, 0, []] for name in decoders}
    for batch in batches:
        for name, decode in decoders.items():
            (outs, stats), seconds = timed(lambda: decode(batch), device)
            r = results[name]
            r[0] += seconds
            r[1] += sum(map(len, outs))
            r[2] += sum(map(len, outs)) if stats is None else sum(s["forwards"] for s in stats)
            r[3] += outs
    return results


def median_ms(fn, device, repeats):
    """Median milliseconds of a call of fn, each call waited for (a latency; warm up before)."""
    return 1e3 * sorted(timed(fn, device)[1] for _ in range(repeats))[repeats // 2]


def bench_batch_one(models, prompts, draft_lens, max_new_tokens, device):
    print(f"\n1. decoding at batch 1, greedy, {len(prompts)} prompts of {len(prompts[0])} tokens, up to "
          f"{max_new_tokens} new tokens")
    for (dtype, capture), model in models.items():
        results = decode_all(model, [[p] for p in prompts], draft_lens, max_new_tokens, device, capture)
        print(f"\n{dtype}, {'captured (CUDA graphs)' if capture else 'eager'}")
        print(f"{'method':>10} {'tokens':>7} {'forwards':>9} {'tok/fwd':>8} {'ms/fwd':>7} {'tok/s':>9} {'vs AR':>7}  "
              "identical")
        ar_speed = results["AR"][1] / results["AR"][0]
        for name, (s, n, f, outs) in results.items():
            same = "" if name == "AR" else outs == results["AR"][3]
            print(f"{name:>10} {n:7d} {f:9d} {n / f:8.2f} {1e3 * s / f:7.2f} {n / s:9.1f} "
                  f"{n / s / ar_speed:7.2f}x  {same}")


def bench_batches(models, prompts, batch_sizes, draft_lens, max_new_tokens, device):
    # TiDAR spends a batch-1 forward's idle compute on k + k*k queries per row. As the batch grows the
    # GPU fills up with rows instead, the slots stop being free, and plain AR catches up.
    print(f"\n2. total tokens/s for a batch of prompts decoded together, greedy, up to {max_new_tokens} new tokens")
    for (dtype, capture), model in models.items():
        print(f"\n{dtype}, {'captured (CUDA graphs)' if capture else 'eager'}")
        names = ["AR"] + [f"TiDAR k={k}" for k in draft_lens]
        print(f"{'batch':>6}" + "".join(f" {n:>11}" for n in names)
              + "".join(f" {'vs AR k=' + str(k):>10}" for k in draft_lens))
        stops = {k: None for k in draft_lens}  # the first batch at which TiDAR is not faster
        for B in batch_sizes:
            GRAPHS.clear()  # the last batch's recorded steps and caches: not needed again
            results = decode_all(model, [prompts[:B]], draft_lens, max_new_tokens, device, capture)
            speed = {name: n / s for name, (s, n, f, outs) in results.items()}
            ratios = {k: speed[f"TiDAR k={k}"] / speed["AR"] for k in draft_lens}
            print(f"{B:6d}" + "".join(f" {speed[n]:11.1f}" for n in names)
                  + "".join(f" {ratios[k]:9.2f}x" for k in draft_lens))
            stops.update({k: B for k in draft_lens if stops[k] is None and ratios[k] <= 1})
        for k, B in stops.items():
            before = batch_sizes[batch_sizes.index(B) - 1] if B and B != batch_sizes[0] else None
            verdict = (f"faster than AR at every batch measured, up to {batch_sizes[-1]}" if B is None
                       else f"faster than AR up to batch {before}, not at {B}" if before
                       else f"not faster than AR, even at batch {B}")
            print(f"TiDAR k={k}: {verdict}")

def bench_query_sweep(models, cache_len, max_queries, draft_lens, repeats, device):
    # A forward's cost hardly grows with its query count until the device is compute-bound: the slots below
    # that point are free, and TiDAR spends them on k + k*k queries per step (the paper's Figure 1).
    model = next(iter(models.values()))
    config = model.config
    print(f"\n3. forward latency (ms) against query tokens, KV cache of {cache_len} tokens")
    tokens = torch.randint(0, config.vocab_size, (1, cache_len + max_queries), device=device)
    marks = {k + k * k: k for k in draft_lens}
    sizes = sorted({2**i for i in range(max_queries.bit_length()) if 2**i <= max_queries} | set(marks))
    beyond = [T for T in sizes if cache_len + T > config.seq_len]
    sizes = [T for T in sizes if T not in beyond]
    ms = {}
    for (dtype, capture), m in models.items():
        for T in sizes:
            cache = KVCache(config, 1, cache_len + T, device, next(m.parameters()).dtype)
            with torch.no_grad():
                prefix = causal_mask(cache_len, 0, cache.max_len, device)
                m(tokens[:, :cache_len], torch.arange(cache_len, device=device), prefix, cache)
                cache.length.fill_(cache_len)
                idx, pos = tokens[:, cache_len : cache_len + T], torch.arange(cache_len, cache_len + T, device=device)
                mask = causal_mask(T, cache_len, cache.max_len, device)
                forward = lambda: m(idx, pos, mask, cache)  # writes past the committed length: repeatable
                forward = cuda_graph(forward) if capture else forward
                forward()
                ms[dtype, capture, T] = median_ms(forward, device, repeats)
    columns = [(d, c) for d, c in models]
    print(f"{'queries':>8}" + "".join(f" {d + (' graph' if c else ' eager'):>16} {'vs 1':>5}" for d, c in columns))
    for T in sizes:
        mark = f"  <- k + k*k for k = {marks[T]}" if T in marks else ""
        cells = "".join(f" {ms[d, c, T]:16.3f} {ms[d, c, T] / ms[d, c, sizes[0]]:5.2f}" for d, c in columns)
        print(f"{T:8d}{cells}{mark}")
    if beyond:
        print(f"(not run, cache + queries beyond the model's context of {config.seq_len}: {beyond})")


def bench_training(model, batch, repeats, device):
    config = model.config
    S = config.seq_len
    compiled = device == "cuda"  # as train.py does: compiled, so that FlexAttention runs fused
    print(f"\n4. training step (forward, backward, AdamW), batch {batch}, S = {S}, B = {config.block_len}"
          f"{', bf16, compiled' if compiled else ''}")
    model = copy.deepcopy(model).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=compiled)  # as train.py: fused on CUDA
    if compiled:
        torch.set_float32_matmul_precision("high")  # as train.py: TF32 for what autocast leaves in float32
    forward = torch.compile(model, dynamic=False) if compiled else model  # S and 2S: one static graph each
    data = torch.randint(0, config.vocab_size, (batch, S + 1), device=device)
    x, y = data[:, :-1], data[:, 1:]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()

    def step(objective):
        with autocast:
            loss = training_loss(forward, config, x, y, objective, flex=compiled)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for objective in ("ar", "tidar", "ar", "tidar"):
        step(objective)  # warm-up (and compilation)
    ms = {obj: median_ms(lambda: step(obj), device, repeats) for obj in ("ar", "tidar")}
    print(f"AR {ms['ar']:.1f} ms/iter, TiDAR {ms['tidar']:.1f} ms/iter (doubled sequence): "
          f"{ms['tidar'] / ms['ar']:.2f}x")


def val_prompts(data_dir, n, prompt_len, config):
    """n held-out prompts of prompt_len tokens, spread evenly over the val split (the same every run)."""
    path = os.path.join(data_dir, "val.bin")
    if not os.path.exists(path):
        fail(f"no {path} to take prompts from: `python train.py` prepares the default dataset, or pass --data_dir")
    val = np.memmap(path, dtype=np.uint16, mode="r")
    if len(val) < prompt_len + 1:
        fail(f"{path} holds {len(val)} tokens, too few for prompts of {prompt_len}: lower --prompt_len")
    if val.max() >= config.vocab_size:
        fail(f"{path} holds token ids up to {val.max()}, beyond the model's vocabulary of {config.vocab_size}: "
             "it is not the dataset this checkpoint was trained on; pass its --data_dir")
    starts = np.linspace(0, len(val) - prompt_len - 1, n).astype(np.int64)
    return [val[s : s + prompt_len].astype(np.int64).tolist() for s in starts]


def check_fits(config, prompt_len, max_new_tokens, room):
    """Prompts, new tokens and the drafts' room must fit in the model's context; else say what would."""
    need = prompt_len + max_new_tokens + room
    if need > config.seq_len:
        fits = config.seq_len - prompt_len - room
        fail(f"--prompt_len ({prompt_len}) + --max_new_tokens ({max_new_tokens}) + room for the drafts ({room}) = "
             f"{need} exceeds the model's context of {config.seq_len}: "
             + (f"use --max_new_tokens={fits} or less" if fits > 0 else "shorten --prompt_len or the draft lengths"))


def main(args):
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        fail(str(e))
    cuda = args.device == "cuda"
    model, _ = load_checkpoint(args.out_dir, args.device)
    config = model.config
    try:
        draft_lens = [int(k) for k in args.draft_lens.split(",")]
        batch_sizes = [int(b) for b in (args.batches or ("1,2,4,8,16,32,64" if cuda else "1,2,4,8")).split(",")]
    except ValueError:
        fail("--draft_lens and --batches take comma-separated integers, like --draft_lens=4,8,16")
    dtypes = (args.dtypes or ("float32,bfloat16" if cuda else "float32")).split(",")
    if not all(isinstance(getattr(torch, d, None), torch.dtype) for d in dtypes):
        fail(f"--dtypes={args.dtypes}: use torch dtype names, like --dtypes=float32,bfloat16")
    if min(draft_lens) < 1 or min(batch_sizes) < 1 or args.num_prompts < 1 or args.prompt_len < 1:
        fail("draft lengths, batch sizes, --num_prompts and --prompt_len must be at least 1")
    room = 2 * max(draft_lens)  # the last step's blocks reach 2k - 1 positions past the last token
    args.max_new_tokens = args.max_new_tokens or max(1, min(256, config.seq_len - args.prompt_len - room))
    args.cache_len = args.cache_len or min(256, config.seq_len // 2)
    check_fits(config, args.prompt_len, args.max_new_tokens, 2 * max(draft_lens))
    prompts = val_prompts(args.data_dir, max(args.num_prompts, max(batch_sizes)), args.prompt_len, config)
    name = torch.cuda.get_device_name() if cuda else args.device
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {name}, torch {torch.__version__}, model: {n_params / 1e6:.2f}M parameters, {config}")
    by_dtype = {d: model if d == "float32" else copy.deepcopy(model).to(getattr(torch, d)) for d in dtypes}
    models = {(d, capture): m for d, m in by_dtype.items() for capture in ([False, True] if cuda else [False])}
    bench_batch_one(models, prompts[: args.num_prompts], draft_lens, args.max_new_tokens, args.device)
    bench_batches(models, prompts, batch_sizes, draft_lens, args.max_new_tokens, args.device)
    bench_query_sweep(models, args.cache_len, args.max_queries, draft_lens, args.repeats, args.device)
    bench_training(model, args.train_batch, args.repeats, args.device)


if __name__ == "__main__":
    main(parser.parse_args())
