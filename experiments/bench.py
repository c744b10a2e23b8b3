"""
Measures what RESULTS.md reports, in one run on one device:
  1. decoding at batch 1: AR and TiDAR tokens/s, tokens per forward and their ratio, greedy, on held-out
     prompts, for several draft lengths; eager (Python launches every kernel) and, on CUDA, replayed from
     CUDA graphs; in each dtype; and whether TiDAR's outputs were identical to AR's
  2. batches: total tokens/s of AR and TiDAR for batches of 1, 2, 4, ... prompts decoded together, and
     up to which batch TiDAR beats AR
  3. free token slots (the paper's Figure 1 for this model): forward latency against the number of query
     tokens, with a KV cache of up to 256 tokens; where k + k*k falls
     (2 and 3 on CUDA replay every step from CUDA graphs: AR and TiDAR each at its fastest)
  4. training: ms/iter of the TiDAR objective against the AR objective, same context and batch, and of
     TiDAR with greedy-rollout targets (experiments/rollouts.py) in TiDAR steps

    python experiments/bench.py                   # the checkpoint in out/; prompts: data/pycode's val split
    python experiments/bench.py --prompts=FOLDER  # prompts from the .py files under FOLDER: Python never seen
    python experiments/bench.py --sections=1      # decoding at batch 1 only
"""
import argparse
import copy
import json
import os
import sys
from contextlib import nullcontext

# Run from anywhere (`python experiments/bench.py`): the modules it uses sit in the repository's root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import fail, quiet_exits, timed  # noqa: E402

if __name__ == "__main__":
    sys.excepthook = quiet_exits()  # Ctrl-C, from here on, is one line; so is a closed pipe (`... | head`)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.prepare import DATA_DIR  # noqa: E402
from guards import load_model  # noqa: E402
from sample import cuda_graph, generate_ar, generate_tidar  # noqa: E402
from rollouts import training_loss  # noqa: E402
from tidar import KVCache, causal_mask, pick_device  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--out_dir", default="out", help="folder with ckpt.pt")
parser.add_argument("--prompts", default="val", help="where the held-out prompts come from: 'val', the val "
                    "split of --data_dir; or a UTF-8 text file, or a folder and the .py files under it")
parser.add_argument("--data_dir", default=os.path.join(DATA_DIR, "pycode"),
                    help="the dataset of --prompts=val (default: data/pycode in the repository)")
parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
parser.add_argument("--sections", default="1,2,3,4", help="comma-separated: which of the four to run")
parser.add_argument("--eager", action="store_true",
                    help="on CUDA, no CUDA graphs: if recording fails on your GPU")
parser.add_argument("--draft_lens", default="4,8,16", help="comma-separated draft lengths k")
parser.add_argument("--dtypes", default=None, help="comma-separated float32, bfloat16, float16; default "
                    "float32,bfloat16 on CUDA, else float32")
parser.add_argument("--num_prompts", type=int, default=16, help="prompts decoded one at a time in section 1")
parser.add_argument("--batches", default=None, help="batch sizes of section 2; default 1,2,4,...,64 on CUDA, "
                    "1,2,4,8 elsewhere")
parser.add_argument("--prompt_len", type=int, default=64)
parser.add_argument("--max_new_tokens", type=int, default=None,
                    help="default: 256, or what the context leaves")
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
    # Warm-up: first calls pay for kernel selection and allocation. (Captured, every generation, timed ones
    # included, runs its first step eagerly and records its own graph: that cost is part of decoding.)
    for decode in decoders.values():
        decode(batches[0])
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
        print(f"{'method':>10} {'tokens':>7} {'forwards':>9} {'tok/fwd':>8} {'ms/fwd':>7} {'tok/s':>9} "
              f"{'vs AR':>7}  identical")
        ar_speed = results["AR"][1] / results["AR"][0]
        for name, (s, n, f, outs) in results.items():
            same = "" if name == "AR" else outs == results["AR"][3]
            print(f"{name:>10} {n:7d} {f:9d} {n / f:8.2f} {1e3 * s / f:7.2f} {n / s:9.1f} "
                  f"{n / s / ar_speed:7.2f}x  {same}")


def bench_batches(models, prompts, batch_sizes, draft_lens, max_new_tokens, device):
    # TiDAR spends a batch-1 forward's idle compute on k + k*k queries per row. As the batch grows the
    # GPU fills up with rows instead, the slots stop being free, and plain AR catches up.
    print(f"\n2. total tokens/s for a batch of prompts decoded together, greedy, up to {max_new_tokens} new "
          "tokens")
    for (dtype, capture), model in models.items():
        print(f"\n{dtype}, {'captured (CUDA graphs)' if capture else 'eager'}")
        names = ["AR"] + [f"TiDAR k={k}" for k in draft_lens]
        print(f"{'batch':>6}" + "".join(f" {name:>11}" for name in names)
              + "".join(f" {'vs AR k=' + str(k):>10}" for k in draft_lens))
        stops = {k: None for k in draft_lens}  # the first batch at which TiDAR is not faster
        for N in batch_sizes:
            results = decode_all(model, [prompts[:N]], draft_lens, max_new_tokens, device, capture)
            speed = {name: tokens / s for name, (s, tokens, _, _) in results.items()}
            ratios = {k: speed[f"TiDAR k={k}"] / speed["AR"] for k in draft_lens}
            print(f"{N:6d}" + "".join(f" {speed[name]:11.1f}" for name in names)
                  + "".join(f" {ratios[k]:9.2f}x" for k in draft_lens))
            stops.update({k: N for k in draft_lens if stops[k] is None and ratios[k] <= 1})
        for k, N in stops.items():
            before = batch_sizes[batch_sizes.index(N) - 1] if N and N != batch_sizes[0] else None
            verdict = (f"faster than AR at every batch measured, up to {batch_sizes[-1]}" if N is None
                       else f"faster than AR up to batch {before}, not at {N}" if before
                       else f"not faster than AR, even at batch {N}")
            print(f"TiDAR k={k}: {verdict}")

def bench_query_sweep(models, cache_len, max_queries, draft_lens, repeats, device):
    # A forward's cost hardly grows with its query count until the device is compute-bound: the slots below
    # that point are free, and TiDAR spends them on k + k*k queries per step (the paper's Figure 1).
    model = next(iter(models.values()))
    config = model.config
    print(f"\n3. forward latency (ms) against query tokens, KV cache of {cache_len} tokens")
    tokens = torch.randint(0, config.vocab_size, (1, cache_len + max_queries), device=device)
    marks = {k + k * k: k for k in draft_lens if k + k * k <= max_queries}
    sizes = sorted({2**i for i in range(max_queries.bit_length())} | set(marks))
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
                idx = tokens[:, cache_len : cache_len + T]
                pos = torch.arange(cache_len, cache_len + T, device=device)
                mask = causal_mask(T, cache_len, cache.max_len, device)
                forward = lambda: m(idx, pos, mask, cache)  # writes past the committed length: repeatable
                forward = cuda_graph(forward) if capture else forward
                forward()
                ms[dtype, capture, T] = median_ms(forward, device, repeats)
    columns = [(d, c) for d, c in models]
    names = [d + (" graph" if c else " eager") for d, c in columns]
    print(f"{'queries':>8}" + "".join(f" {name:>16} {'vs 1':>5}" for name in names))
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

    def step(objective):  # 'ar', 'tidar', or 'rollout': TiDAR toward its own greedy rollouts (rollouts.py)
        with autocast:
            loss = training_loss(forward, config, x, y, objective.replace("rollout", "tidar"), flex=compiled,
                                 rollout=float(objective == "rollout"))[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    objectives = ("ar", "tidar", "rollout")
    for objective in objectives * 2:
        step(objective)  # warm-up (and compilation)
    ms = {obj: median_ms(lambda: step(obj), device, repeats) for obj in objectives}
    print(f"AR {ms['ar']:.1f} ms/iter, TiDAR {ms['tidar']:.1f} ms/iter (doubled sequence): "
          f"{ms['tidar'] / ms['ar']:.2f}x; TiDAR toward its greedy rollouts (rollouts.py --rollout=1) "
          f"{ms['rollout']:.1f} ms/iter, {ms['rollout'] / ms['tidar']:.2f} TiDAR steps")


def held_out_prompts(args, n, enc):
    """
    n prompts of prompt_len tokens, spread evenly over held-out text (the same every run): the val split of
    data_dir (--prompts=val), or a text file, or the .py files under a folder, in the order of their paths.
    """
    if args.prompts == "val":
        meta_path = os.path.join(args.data_dir, "meta.json")
        if not os.path.exists(meta_path):
            fail(f"no dataset in {args.data_dir} (meta.json is missing) to take prompts from: "
                 "`python train.py` prepares the default one; or pass --data_dir, or --prompts=FILE")
        with open(meta_path) as f:
            tokenizer = json.load(f).get("tokenizer")
        if tokenizer != enc.name:  # the same ids would mean other text
            fail(f"{args.data_dir} was made with tokenizer {tokenizer!r}, but the model in {args.out_dir} "
                 f"reads {enc.name!r}: pass the --data_dir it was trained on")
        path = os.path.join(args.data_dir, "val.bin")
        if not os.path.exists(path):
            fail(f"no {path}: the dataset in {args.data_dir} is incomplete; write it again with "
                 "data/prepare.py")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
    else:
        path = args.prompts
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith(".py"))
        if not files:
            fail(f"--prompts={path}: no such file, nor a folder with .py files in it")
        tokens = []
        for name in files:
            try:
                with open(name, encoding="utf-8") as f:
                    tokens += enc.encode_ordinary(f.read()) + [enc.eot_token]  # documents, as in a dataset
            except (OSError, UnicodeDecodeError) as e:
                fail(f"cannot read {name} ({type(e).__name__}): --prompts takes UTF-8 text")
        tokens = np.array(tokens)
    if len(tokens) < args.prompt_len + 1:
        fail(f"{path} holds {len(tokens)} tokens, too few for prompts of {args.prompt_len}: lower "
             "--prompt_len")
    starts = np.linspace(0, len(tokens) - args.prompt_len - 1, n).astype(np.int64)
    return [tokens[s : s + args.prompt_len].astype(np.int64).tolist() for s in starts]


def check_fits(config, prompt_len, max_new_tokens, room):
    """Prompts, new tokens and the drafts' room must fit in the model's context; else say what would."""
    need = prompt_len + max_new_tokens + room
    if need > config.seq_len:
        fits = config.seq_len - prompt_len - room
        fix = (f"use --max_new_tokens={fits} or less" if fits > 0 else
               "shorten --prompt_len or the draft lengths")
        fail(f"--prompt_len ({prompt_len}) + --max_new_tokens ({max_new_tokens}) + room for the drafts "
             f"({room}) = {need} exceeds the model's context of {config.seq_len}: {fix}")


def integers(text, name):
    """A comma-separated list of integers >= 1, like --draft_lens=4,8,16; or one line saying what is wrong."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = [0]
    if min(values) < 1:
        fail(f"--{name}={text}: give comma-separated integers of at least 1, like --{name}=1,2,4", 2)
    return values


def main(args):
    # Every setting is checked here, before anything runs: a mistake found only after minutes of measuring
    # would waste them.
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        fail(str(e), 2)
    cuda = args.device == "cuda"
    sections, draft_lens = integers(args.sections, "sections"), integers(args.draft_lens, "draft_lens")
    batch_sizes = integers(args.batches or ("1,2,4,8,16,32,64" if cuda else "1,2,4,8"), "batches")
    dtypes = (args.dtypes or ("float32,bfloat16" if cuda else "float32")).split(",")
    if not set(dtypes) <= {"float32", "bfloat16", "float16"}:
        fail(f"--dtypes={args.dtypes}: use float32, bfloat16 or float16, comma-separated", 2)
    if not set(sections) <= {1, 2, 3, 4}:
        fail(f"--sections={args.sections}: the sections are 1 to 4", 2)
    for name in ("num_prompts", "prompt_len", "max_queries", "train_batch", "repeats", "max_new_tokens",
                 "cache_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name}={getattr(args, name)}: must be at least 1", 2)
    model, enc = load_model(args.out_dir, args.device)
    config = model.config
    room = 2 * max(draft_lens)  # the last step's blocks reach 2k - 1 positions past the last token
    if args.max_new_tokens is None:
        args.max_new_tokens = max(1, min(256, config.seq_len - args.prompt_len - room))
    args.cache_len = args.cache_len or min(256, config.seq_len // 2)
    check_fits(config, args.prompt_len, args.max_new_tokens, room)
    prompts = held_out_prompts(args, max(args.num_prompts, max(batch_sizes)), enc)
    name = torch.cuda.get_device_name() if cuda else f"{args.device} (threads: {torch.get_num_threads()})"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {name}, torch {torch.__version__}, model: {n_params / 1e6:.2f}M parameters, {config}")
    where = args.data_dir + "'s val split" if args.prompts == "val" else args.prompts
    print(f"prompts: {args.prompt_len} tokens each, spread evenly over {where}")
    by_dtype = {d: model if d == "float32" else copy.deepcopy(model).to(getattr(torch, d)) for d in dtypes}
    modes = [False, True] if cuda and not args.eager else [False]  # captured: replayed from CUDA graphs
    models = {(d, capture): m for d, m in by_dtype.items() for capture in modes}
    fastest = {key: m for key, m in models.items() if key[1] == modes[-1]}  # AR against TiDAR at their best
    if 1 in sections:
        bench_batch_one(models, prompts[: args.num_prompts], draft_lens, args.max_new_tokens, args.device)
    if 2 in sections:
        bench_batches(fastest, prompts, batch_sizes, draft_lens, args.max_new_tokens, args.device)
    if 3 in sections:
        bench_query_sweep(fastest, args.cache_len, args.max_queries, draft_lens, args.repeats, args.device)
    if 4 in sections:
        bench_training(model, args.train_batch, args.repeats, args.device)


if __name__ == "__main__":
    main(parser.parse_args())
