"""
Train a TiDAR model (or, with --objective=ar, the plain AR baseline) on the tokens in data_dir.

    python train.py                                    # one process, whatever device is there
    torchrun --standalone --nproc_per_node=8 train.py  # DDP: nccl on CUDA, gloo on CPU
    python train.py --init_from=resume                 # continue out_dir/ckpt.pt where it stopped
    python train.py --objective=ar --out_dir=out-ar    # the paper's recipe: an AR model first ...
    python train.py --init_from=out-ar                 # ... then TiDAR from them (continual pretraining)
    python train.py --help                             # the settings, their defaults and valid values

Every setting below can be overridden with --name=value. The defaults are sized for one GPU; with no GPU
a fresh run takes the smaller cpu_preset instead (settings given on the command line still win over it).
What keeps a run from failing late or losing work (the checks, the lock, the atomic save) is in guards.py.
"""
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import guards
from configurator import fail, parse_overrides, quiet_exits

# Ctrl-C while starting: one line (the loop and the data preparation catch theirs); so is `--help | head`
sys.excepthook = quiet_exits(" before training started; nothing was written")

# -----------------------------------------------------------------------------
# Settings. The defaults are sized for one GPU: 25.4M parameters, 6000 steps of 32 sequences of 1024 tokens,
# the first 4000 plain AR and the rest TiDAR from those weights (the paper's recipe), bf16, compiled.
out_dir = "out"  # holds ckpt.pt
overwrite = False  # False: a fresh run refuses to replace out_dir/ckpt.pt | True: it may
data_dir = "data/pycode"  # from data/prepare.py; a missing folder named pycode is prepared on the spot
objective = "tidar"  # 'tidar' (doubled sequence, AR + diffusion loss) | 'ar' (plain AR baseline, same data)
ar_iters = 4000  # 0 .. max_iters - 1: the first steps train plain AR, then TiDAR from them (0: from scratch)
alpha = 1.0  # >= 0: loss = (alpha * AR + diffusion) / (1 + alpha), README "Training: the doubled sequence"
seq_len = 1024  # S >= 1, clean tokens per sequence; the model sees the doubled sequence of 2S
block_len = 16  # B >= 1, the mask block length, a divisor of S; the default draft length in sample.py
n_layer = 8  # >= 1
n_head = 8  # >= 1
n_embd = 512  # a multiple of 2 * n_head (rotary positions need an even head size)
batch_size = 32  # >= 1 sequences per micro-step, per process
grad_accum = 1  # >= 1 micro-steps per optimizer step
max_iters = 6000  # >= 1 optimizer steps; the cosine schedule ends here
lr = 1e-3  # > 0, the peak learning rate, reached after warmup
min_lr = 1e-4  # 0 .. lr, where the cosine decay ends
warmup_iters = 200  # >= 0 steps of linear warmup
weight_decay = 0.1  # >= 0, on matrices and embeddings only
beta1 = 0.9  # AdamW, in [0, 1)
beta2 = 0.99  # AdamW, in [0, 1)
grad_clip = 1.0  # >= 0, the max gradient norm; 0 = off
eval_interval = 1000  # >= 1: evaluate and checkpoint every this many steps, and at the end
eval_iters = 20  # >= 1 val batches per evaluation
log_interval = 10  # >= 1 steps between log lines
init_from = "scratch"  # 'scratch' | 'resume' (out_dir/ckpt.pt: its settings, iterations, schedule) | DIR
# (DIR: another run's folder, say an AR baseline's: start from its weights, with this run's settings, a fresh
# optimizer and schedule; the model's shape and tokenizer must be the checkpoint's)
device = "auto"  # 'auto' (cuda, then mps, then cpu) | 'cuda' | 'mps' | 'cpu'
compile = "auto"  # 'auto' (on with CUDA, where torch.compile works) | True | False
seed = 1337  # >= 0; fixes the initialisation and every batch
# With no GPU (the device resolves to cpu) a fresh run takes these values instead, except those set on the
# command line: 3800 AR steps, then 1400 TiDAR steps, in about the time of 2800 TiDAR steps from scratch (an
# AR step costs about 0.4 of one), for a far better AR loss and drafts as good (RESULTS.md, "Continual
# pretraining: what the recipe buys"). Per step, on 2 cores of one AMD EPYC with torch 2.14.1: 98-115 ms (AR)
# and 256-266 ms (TiDAR); on another 2-core EPYC 340-430 and 850. Machines differ by 3x or more: the log's
# time left is what tells. Time on the CPU goes to the doubled sequence's attention; the shape, context and
# learning rate were chosen by short runs of equal time.
cpu_preset = dict(n_layer=4, n_head=2, n_embd=128, seq_len=256, block_len=8, batch_size=6, ar_iters=3800,
                  max_iters=5200, warmup_iters=100, lr=2e-3, min_lr=2e-4, eval_interval=950, eval_iters=20)
# -----------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
choices = dict(objective=("tidar", "ar"), device=("auto", "cuda", "mps", "cpu"),
               compile=("auto", True, False))
overrides = parse_overrides(sys.argv[1:], settings, choices, __file__, cpu_preset)
globals().update(overrides)
guards.check_values(globals())  # a bad value stops here, with one line naming it, not later as a traceback

# torch only now: --help and a mistyped setting answer at once, not after the second that importing it takes
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tidar import GPT, GPTConfig, evaluate_batch, pick_device, training_loss  # noqa: E402

try:
    device_type = pick_device(device)  # 'cuda' | 'mps' | 'cpu'
except ValueError as e:
    fail(str(e), 2)

# -----------------------------------------------------------------------------
# Where the run starts: from scratch, from out_dir/ckpt.pt (resume), or from another run's weights
ckpt_path = os.path.join(out_dir, "ckpt.pt")
resume, from_run = init_from == "resume", init_from not in ("scratch", "resume")
ckpt = saved_iter = started_from = None  # saved_iter: the iteration of the last checkpoint in out_dir, if any
if resume:
    ckpt = guards.resume_checkpoint(ckpt_path)
    # Resume with the run's own settings (so the same schedule), then whatever the command line says.
    # The machine-specific ones stay as given here.
    keep = {"out_dir", "overwrite", "init_from", "device", "compile"} | set(overrides)
    globals().update({k: v for k, v in ckpt["train_config"].items() if k in settings and k not in keep})
    saved_iter, started_from = ckpt["iter_num"], ckpt.get("started_from")
    guards.check_unfinished(ckpt_path, saved_iter, max_iters)
elif from_run:  # continual pretraining (README, "Continual pretraining"): another run's weights only
    source = os.path.join(init_from, "ckpt.pt")
    ckpt = guards.source_checkpoint(init_from, source)
    started_from = dict(checkpoint=os.path.abspath(source), objective=ckpt["train_config"].get("objective"),
                        iter_num=ckpt["iter_num"])
cpu_run = not resume and device_type == "cpu"
if cpu_run:
    globals().update({k: v for k, v in cpu_preset.items() if k not in overrides})
if from_run and "ar_iters" not in overrides:  # the weights are trained already: straight to the objective
    ar_iters = 0
train_config = {k: globals()[k] for k in settings}
guards.check_agreement(**train_config)
if data_dir == "data/pycode":  # the default dataset lives beside train.py, wherever train.py is started from
    data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), data_dir)
meta_path = os.path.join(data_dir, "meta.json")
default_data = os.path.basename(os.path.normpath(data_dir)) == "pycode"  # prepared on the spot when missing
guards.check_dataset_exists(data_dir, default_data)

# -----------------------------------------------------------------------------
# Processes and output. torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; a plain `python train.py` is rank 0 of 1.
rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
world_size = int(os.environ.get("WORLD_SIZE", 1))
ddp, master = world_size > 1, rank == 0
guards.claim_out_dir(out_dir, fresh=not resume and not overwrite, master=master)  # and lock it, one writer
last = guards.LastCheckpoint(ckpt_path, saved_iter)  # named by every line that stops the run
if master and cpu_run:
    preset = " ".join(f"{k}={globals()[k]}" for k in cpu_preset)
    two_stages = ar_iters and objective == "tidar"
    stages = f"{ar_iters} AR steps, then {max_iters - ar_iters} TiDAR steps from them; " if two_stages else ""
    print(f"no GPU: training the CPU preset instead of the GPU defaults ({preset}); {stages}the log shows "
          "the time left; --help lists the settings", flush=True)

device = device_type
if ddp:
    from torch.distributed import barrier, destroy_process_group, init_process_group
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
if compile == "auto":
    compile = device_type == "cuda" and sys.platform == "linux"  # elsewhere it is slow to start, or missing
if device_type == "cuda":
    torch.set_float32_matmul_precision("high")  # TF32 for whatever autocast leaves in float32
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
flex = compile and device_type == "cuda"  # FlexAttention: fused only when compiled; no CPU backward
torch.manual_seed(seed)

# -----------------------------------------------------------------------------
# Data: one long stream of token ids per split; a batch is N = batch_size random windows of S + 1 tokens.
if not os.path.exists(meta_path):  # the default dataset, not prepared yet
    if master:
        from data.prepare import prepare_pycode

        print(f"preparing the default dataset in {data_dir}: the .py sources of the standard library, torch, "
              "numpy and tiktoken (a few seconds)...", flush=True)
        try:
            m = prepare_pycode(data_dir)
        except KeyboardInterrupt:
            kept = "nothing of it was kept; the next run prepares it again"
            guards.stop_interrupted(f"while preparing {data_dir} ({kept})", last, master)
        except OSError as e:
            fail(f"cannot prepare {data_dir}: {e}")
        print(f"{m['n_files']} files, {m['train_tokens']:,} train and {m['val_tokens']:,} val tokens")
    if ddp:
        barrier()
vocab_size, eot_id, tokenizer = guards.read_dataset(data_dir, seq_len, default_data)


def get_batch(split, *key):
    """
    x (N, S) and y (N, S), y being x shifted by one, from N random windows of one split. The windows are a
    function of (seed, split, key) alone (choice): in training key = (rank, n) for this process's n-th
    micro-batch, so a resumed run draws exactly the batches the uninterrupted run would have, and nothing
    about the data order needs saving; key = (i,) gives the i-th val batch, the same at every evaluation.
    """
    # a fresh memmap every batch: a long-lived one keeps the pages it touched (nanoGPT does the same)
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    rng = np.random.default_rng([seed, split == "val", *key])
    starts = rng.integers(len(data) - seq_len, size=batch_size)
    chunk = np.stack([data[i : i + seq_len + 1] for i in starts]).astype(np.int64)
    chunk = torch.from_numpy(chunk)  # (N, S+1)
    x, y = chunk[:, :-1], chunk[:, 1:]  # (N, S) each
    if device_type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# Model and optimizer
model_config = GPTConfig(vocab_size=vocab_size, eot_id=eot_id, seq_len=seq_len, block_len=block_len,
                         n_layer=n_layer, n_head=n_head, n_embd=n_embd)
model = raw_model = GPT(model_config).to(device)  # raw_model: the plain module, for checkpoints
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]  # LayerNorm gains
groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), fused=device_type == "cuda")
iter_num, best_val_loss = 0, float("inf")
if ckpt is not None:
    # Starting from another run's AR model, the [MASK] row of the embedding is what that checkpoint holds:
    # its random initialisation, shrunk by weight decay, as AR training never feeds a [MASK] and never gave
    # it a gradient. A small random vector is how every other row started; the diffusion loss trains it from
    # the first step.
    guards.load_checkpoint(ckpt, ckpt_path if resume else source, raw_model, optimizer, tokenizer, resume)
    if resume:
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    ckpt = None  # free the memory
n_params = sum(p.numel() for p in raw_model.parameters())
if master:
    guards.check_disk_space(out_dir, n_params)
if compile:
    model = torch.compile(model, dynamic=False)  # S (the AR stage) and 2S tokens: each shape compiles once
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)


def evaluate():
    """Val AR loss, diffusion loss, and draft accuracy by offset inside the block, (block_len,)."""
    ar = diff = 0.0
    hits = torch.zeros(block_len)
    for i in range(eval_iters):
        x, y = get_batch("val", i)
        with autocast:
            # an AR model's untrained diffusion half is reported too, as a reference
            a, d, h = evaluate_batch(model, model_config, x, y, flex)
        ar, diff, hits = ar + a, diff + d, hits + h
    return ar / eval_iters, diff / eval_iters, hits / eval_iters


def get_lr(it):
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# -----------------------------------------------------------------------------
# Training loop
tokens_per_iter = batch_size * grad_accum * world_size * seq_len  # clean tokens; the model sees twice as many
if master:
    if from_run:
        was_ar = started_from["objective"] == "ar"
        untrained = "; an AR model never trained its [MASK] embedding" if was_ar else ""
        print(f"starting from the weights of {source} ({'an AR' if was_ar else 'a TiDAR'} run at iter "
              f"{started_from['iter_num']}), with a fresh optimizer and schedule{untrained}", flush=True)
    threads = f" (threads: {torch.get_num_threads()})"  # OMP_NUM_THREADS sets it
    how = " (bf16)" if device_type == "cuda" else threads if device_type == "cpu" else ""
    if objective == "tidar" and ar_iters > iter_num:
        print(f"steps {iter_num}..{ar_iters - 1} train plain AR, steps {ar_iters}..{max_iters - 1} TiDAR "
              "from those weights (continual pretraining, the paper's recipe; --ar_iters=0 trains TiDAR from "
              "scratch)", flush=True)
    print(f"{objective} model: {n_params / 1e6:.2f}M parameters, S={seq_len}, B={block_len}, "
          f"vocab {vocab_size} ({tokenizer}); {tokens_per_iter:,} tokens/iter on {world_size} x {device}{how}"
          f"{', compiled' if compile else ''}; from iter {iter_num}", flush=True)
iter_start = t_iter = iter_num
t_start = t0 = time.time()
eval_time = 0.0
try:
    x, y = get_batch("train", rank, iter_num * grad_accum)
    while True:
        if iter_num % eval_interval == 0 or iter_num == max_iters:
            t_eval = time.time()
            ar, diff, acc = evaluate()
            val_loss = ar if objective == "ar" else (alpha * ar + diff) / (1 + alpha)
            guards.check_finite("val loss", val_loss, iter_num, last)
            best_val_loss = min(best_val_loss, val_loss)
            if master:
                bpb = f", {ar / math.log(2):.3f} bits/byte" if tokenizer == "byte" else ""
                acc = " ".join(f"{100 * a:.0f}" for a in acc.tolist())
                print(f"eval {iter_num}: val loss {val_loss:.4f} (ar {ar:.4f}{bpb}; diff {diff:.4f}) | "
                      f"draft acc % by offset 0..{block_len - 1}: {acc}", flush=True)
                if iter_num > iter_start:  # the plain module's weights, with all that resuming needs
                    guards.save_checkpoint(dict(
                        model=raw_model.state_dict(), model_config=asdict(model_config),
                        train_config=train_config, tokenizer=tokenizer, iter_num=iter_num,
                        best_val_loss=best_val_loss, optimizer=optimizer.state_dict(),
                        started_from=started_from), last)
            t0, t_iter = time.time(), iter_num  # evaluation time is not training time
            eval_time = t0 - t_eval
        if iter_num >= max_iters:
            break

        lr_now = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        stage = "ar" if iter_num < ar_iters else objective  # the AR stage first (--ar_iters), then TiDAR
        for micro_step in range(grad_accum):
            if ddp:  # average gradients across processes only once, on the last micro-step
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with autocast:
                loss, ar, diff = training_loss(model, model_config, x, y, stage, alpha, flex)
            # fetch the next micro-batch while the device works on this one
            x, y = get_batch("train", rank, iter_num * grad_accum + micro_step + 1)
            (loss / grad_accum).backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1

        if iter_num % log_interval == 0:
            lossf = loss.item()  # the last micro-step's; .item() waits for the device: only every few steps
            guards.check_finite("loss", lossf, iter_num, last)
            dt = (time.time() - t0) / (iter_num - t_iter)
            # In the AR stage the time left is that stage's: a TiDAR step's cost is unknown until one has run.
            end = ar_iters if objective == "tidar" and iter_num < ar_iters else max_iters
            evals_left = end // eval_interval - iter_num // eval_interval
            evals_left += end == max_iters and end % eval_interval > 0  # and the one at the very end
            left = dt * (end - iter_num) + evals_left * eval_time
            then = f" of the AR stage, then {max_iters - end} TiDAR steps" if end < max_iters else ""
            t0, t_iter = time.time(), iter_num
            if master:
                terms = f"ar {ar.item():.4f}" + (f", diff {diff.item():.4f}" if diff is not None else "")
                print(f"iter {iter_num}: loss {lossf:.4f} ({terms}), lr {lr_now:.2e}, "
                      f"{1000 * dt:.0f} ms/iter, {tokens_per_iter / dt:,.0f} tok/s, "
                      f"{int(left) // 60}m{int(left) % 60:02d}s left{then}", flush=True)
except KeyboardInterrupt:
    guards.stop_interrupted(f"at iter {iter_num}", last, master)
if master:
    took = int(time.time() - t_start)
    print(f"done: iters {iter_start}..{iter_num} in {took // 60}m{took % 60:02d}s; {last}; decode it "
          f"with `python sample.py --out_dir={out_dir} --prompt ...`", flush=True)

if ddp:
    destroy_process_group()
