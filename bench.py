"""
Measures what the README's results section reports, in one run, at batch 1 on one device:
  1. decoding: AR and TiDAR tokens/s, tokens per forward and their ratio, greedy, on held-out prompts
     from the val split, for several draft lengths; and whether the outputs were identical
  2. free token slots (the paper's Figure 1 for this model): forward latency against the number of
     query tokens, with a KV cache of a few hundred tokens; where k + k*k falls. Eager, as sample.py
     runs, and on CUDA also replayed from CUDA graphs (float32 and bfloat16): the GPU's own time
  3. training: ms/iter of the TiDAR objective against the AR objective, same context and batch

    python bench.py                       # the checkpoint in out/, prompts from data/pystdlib/val.bin
    python bench.py --num_prompts=16      # the README's H100 results
"""
import argparse
import copy
import os
import statistics
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
parser.add_argument("--repeats", type=int, default=20, help="timed repeats per forward / training step")


def timed(fn, device, repeats=1):
    """Median seconds of a call of fn, each call waited for (a latency; warm up before), and its last result."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        sync()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), result


def bench_decoding(model, prompts, draft_lens, max_new_tokens, device):
    print(f"\n1. decoding, greedy, batch 1, {len(prompts)} prompts of {len(prompts[0])} tokens, "
          f"up to {max_new_tokens} new tokens")

    def ar(p):
        out = generate_ar(model, p, max_new_tokens)
        return out, {"forwards": len(out)}  # one forward per token, the prefill's included

    decoders = {"AR": ar}
    for k in draft_lens:
        decoders[f"TiDAR k={k}"] = lambda p, k=k: generate_tidar(model, p, max_new_tokens, draft_len=k)
    for decode in decoders.values():
        decode(prompts[0])  # warm-up: first calls pay for kernel selection and allocation
    # Each prompt is decoded by every method in turn, so a drift in the machine's speed hits them all alike.
    seconds, tokens, forwards, outputs = ({name: [] for name in decoders} for _ in range(4))
    for p in prompts:
        for name, decode in decoders.items():
            s, (out, stats) = timed(lambda: decode(p), device)
            seconds[name].append(s)
            tokens[name].append(len(out))
            forwards[name].append(stats["forwards"])
            outputs[name].append(out)
    print(f"{'method':>10} {'tokens':>7} {'forwards':>9} {'tok/fwd':>8} {'ms/fwd':>7} {'tok/s':>9} {'vs AR':>7}  "
          "identical")
    ar_speed = sum(tokens["AR"]) / sum(seconds["AR"])
    for name in decoders:
        n, f, s = sum(tokens[name]), sum(forwards[name]), sum(seconds[name])
        same = "" if name == "AR" else outputs[name] == outputs["AR"]
        print(f"{name:>10} {n:7d} {f:9d} {n / f:8.2f} {1e3 * s / f:7.2f} {n / s:9.1f} {n / s / ar_speed:7.2f}x  {same}")


def graph_timed(forward, repeats):
    """Median seconds of a forward replayed from a CUDA graph: the GPU's own time, without Python's launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()  # warm-up on a side stream, as graph capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    graph.replay()
    return timed(graph.replay, "cuda", repeats)[0]


def bench_query_sweep(model, cache_len, max_queries, draft_lens, repeats, device):
    # A forward's cost hardly grows with its query count until the GPU is compute-bound: the slots below
    # that point are free, and TiDAR spends them on k + k*k queries per step (the paper's Figure 1).
    # Measured as sample.py runs (eager, Python launching every kernel) and, on CUDA, replayed from a CUDA
    # graph, which leaves only the GPU's time: in float32 as sample.py decodes, and in bfloat16.
    config = model.config
    print(f"\n2. forward latency (ms) against query tokens, KV cache of {cache_len} tokens")
    tokens = torch.randint(0, config.vocab_size, (1, cache_len + max_queries), device=device)
    marks = {k + k * k: k for k in draft_lens}
    sizes = sorted({2**i for i in range(max_queries.bit_length()) if 2**i <= max_queries} | set(marks))
    beyond = [T for T in sizes if cache_len + T > config.seq_len]
    sizes = [T for T in sizes if T not in beyond]
    models = {"eager": model}
    if device == "cuda":
        models |= {"graph fp32": model, "graph bf16": copy.deepcopy(model).to(torch.bfloat16)}
    ms = {}
    for column, m in models.items():
        cache = KVCache(config, cache_len, device=device, dtype=next(m.parameters()).dtype)
        with torch.no_grad():
            prefix, pos = tokens[:, :cache_len], torch.arange(cache_len, device=device)
            m(prefix, pos, causal_mask(cache_len, device=device), cache, n_causal=cache_len)
            for T in sizes:  # n_causal = 0: nothing is written, the cache stays as it is
                idx, pos = tokens[:, cache_len : cache_len + T], torch.arange(cache_len, cache_len + T, device=device)
                mask = causal_mask(T, cache_len, device=device)
                forward = lambda: m(idx, pos, mask, cache, n_causal=0)
                if column == "eager":
                    forward()
                    ms[column, T] = 1e3 * timed(forward, device, repeats)[0]
                else:
                    ms[column, T] = 1e3 * graph_timed(forward, repeats)
    print(f"{'queries':>8}" + "".join(f" {c:>10} {'vs 1':>5}" for c in models))
    for T in sizes:
        mark = f"  <- k + k*k for k = {marks[T]}" if T in marks else ""
        print(f"{T:8d}" + "".join(f" {ms[c, T]:10.3f} {ms[c, T] / ms[c, sizes[0]]:5.2f}" for c in models) + mark)
    if beyond:
        print(f"(not run, cache + queries beyond the model's context of {config.seq_len}: {beyond})")


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

    for objective in ("ar", "tidar"):
        step(objective)  # warm-up
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
