"""
Train a TiDAR model (or, with --objective=ar, the plain AR baseline) on the tokens in data_dir.

    python train.py                                  # one process, whatever device is there
    torchrun --standalone --nproc_per_node=8 train.py  # DDP: nccl on CUDA, gloo on CPU
    python train.py --init_from=resume               # continue out_dir/ckpt.pt where it stopped

Every setting below can be overridden with --name=value. On a CPU, a small run that took 1.5 minutes
on 2 cores (val loss 5.60 -> 2.22, AR 2.54 bits/byte, draft accuracy 43% at offset 0 down to 32% at offset 7):
    python train.py --device=cpu --n_layer=2 --n_head=4 --n_embd=128 --seq_len=128 --block_len=8 \
        --batch_size=16 --max_iters=500 --warmup_iters=50 --lr=2e-3 --eval_interval=250 --eval_iters=10
"""
import ast
import difflib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from tidar import GPT, GPTConfig, ar_inputs, pick_device, tidar_inputs, tidar_loss

# -----------------------------------------------------------------------------
# Settings. The defaults train in about 5 minutes on one H100 (bf16, compiled; measured: 62 ms/iter, 308 s
# including data preparation, compilation and evaluations): 25.4M parameters, 4000 steps of 32 sequences.
out_dir = "out"  # holds ckpt.pt
data_dir = "data/pystdlib"  # from data/prepare.py; a missing folder named pystdlib is prepared on the spot
objective = "tidar"  # 'tidar' (doubled sequence, AR + diffusion loss) | 'ar' (plain AR baseline, same data)
alpha = 1.0  # loss = (alpha * AR + diffusion) / (1 + alpha), TIDAR.md section 2
seq_len = 1024  # S, clean tokens per sequence; the model sees the doubled sequence of 2S
block_len = 16  # B, the mask block length; a divisor of seq_len, and the default draft length in sample.py
n_layer = 8
n_head = 8
n_embd = 512  # a multiple of 2 * n_head (rotary positions need an even head size)
batch_size = 32  # sequences per micro-step, per process
grad_accum = 1  # micro-steps per optimizer step
max_iters = 4000  # optimizer steps; the cosine schedule ends here
lr = 1e-3  # peak learning rate, reached after warmup
min_lr = 1e-4  # where the cosine decay ends
warmup_iters = 200
weight_decay = 0.1  # on matrices and embeddings only
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # max gradient norm; 0 = off
eval_interval = 1000  # evaluate and checkpoint every this many steps, and at the end
eval_iters = 20  # val batches per evaluation
log_interval = 10  # steps between log lines
init_from = "scratch"  # 'scratch' | 'resume' (out_dir/ckpt.pt: its settings, iteration count and schedule)
device = "auto"  # 'auto' (cuda, then mps, then cpu) | 'cuda' | 'mps' | 'cpu'
compile = "auto"  # 'auto' (on with CUDA, where torch.compile works) | True | False
seed = 1337
# -----------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
choices = dict(objective=("tidar", "ar"), init_from=("scratch", "resume"), device=("auto", "cuda", "mps", "cpu"),
               compile=("auto", True, False))


def fail(msg, code=1):
    print(f"train.py: error: {msg}", file=sys.stderr)  # one line, no traceback
    sys.exit(code)


overrides = {}  # --name=value: a Python literal, or the bare text for settings that are strings
for arg in sys.argv[1:]:
    key, eq, raw = arg.removeprefix("--").partition("=")
    if not arg.startswith("--") or not eq or key not in settings:
        near = difflib.get_close_matches(key, settings, 1)
        fail(f"unknown setting {arg!r}" + (f" (did you mean --{near[0]}?)" if near else "") +
             f"; use --name=value with a name from: {', '.join(settings)}", 2)
    default = settings[key]
    try:
        value = raw if isinstance(default, str) and key not in choices else ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    value = float(value) if type(default) is float and type(value) is int else value
    if key in choices and not any(value == c and type(value) is type(c) for c in choices[key]):
        fail(f"--{key}={raw}: expected one of {', '.join(map(repr, choices[key]))}", 2)
    if key not in choices and type(value) is not type(default):
        fail(f"--{key}={raw}: expected {type(default).__name__} (like --{key}={default!r})", 2)
    overrides[key] = value
globals().update(overrides)

ckpt_path = os.path.join(out_dir, "ckpt.pt")
ckpt = None
if init_from == "resume":
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"no checkpoint {ckpt_path} to resume from: check --out_dir, or start with --init_from=scratch")
    except Exception as e:
        fail(f"cannot read checkpoint {ckpt_path} ({type(e).__name__}): it is damaged or not from train.py; "
             "move it away and start with --init_from=scratch")
    needed = {"model", "model_config", "train_config", "tokenizer", "iter_num", "best_val_loss", "optimizer"}
    missing = sorted(needed - set(ckpt)) if isinstance(ckpt, dict) else sorted(needed)
    if missing:
        fail(f"checkpoint {ckpt_path} is incompatible: it lacks {', '.join(missing)}; it was not written by "
             "this train.py, start with --init_from=scratch")
    # Resume with the run's own settings (so the same schedule), then whatever the command line says.
    # The machine-specific ones stay as given here.
    keep = {"out_dir", "init_from", "device", "compile"} | set(overrides)
    globals().update({k: v for k, v in ckpt["train_config"].items() if k in settings and k not in keep})
train_config = {k: globals()[k] for k in settings}
if seq_len % block_len:
    fail(f"seq_len={seq_len} must be a multiple of block_len={block_len}: training blocks tile the sequence", 2)
if n_embd % (2 * n_head):
    fail(f"n_embd={n_embd} must be a multiple of 2 * n_head={2 * n_head}: rotary positions need an even head size", 2)

# -----------------------------------------------------------------------------
# Processes and device. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python train.py` is rank 0 of 1.
rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
world_size = int(os.environ.get("WORLD_SIZE", 1))
ddp, master = world_size > 1, rank == 0
try:
    device = pick_device(device)
except ValueError as e:
    fail(str(e))
device_type = device
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
torch.manual_seed(seed)

# -----------------------------------------------------------------------------
# Data: one long stream of token ids per split; a batch is b = batch_size random windows of S + 1 tokens.
meta_path = os.path.join(data_dir, "meta.json")
if not os.path.exists(meta_path):
    if os.path.basename(os.path.normpath(data_dir)) != "pystdlib":
        fail(f"no dataset in {data_dir} (meta.json is missing): make one with "
             f"`python data/prepare.py --input FILE --name NAME`, then pass --data_dir=data/NAME")
    if master:
        from data.prepare import prepare_stdlib

        print(f"preparing the default dataset in {data_dir} (the Python standard library's sources)...")
        m = prepare_stdlib(data_dir)
        print(f"{m['n_files']} files, {m['train_tokens']:,} train and {m['val_tokens']:,} val tokens")
    if ddp:
        barrier()
with open(meta_path) as f:
    meta = json.load(f)
for split in ("train", "val"):
    n = os.path.getsize(os.path.join(data_dir, f"{split}.bin")) // 2
    if n <= seq_len:
        fail(f"{data_dir}/{split}.bin holds {n} tokens, fewer than seq_len + 1 = {seq_len + 1}: lower --seq_len")


def get_batch(split, generator):
    # a fresh memmap every batch: a long-lived one keeps the pages it touched (nanoGPT does the same)
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    ix = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
    chunk = torch.stack([torch.from_numpy(data[i : i + seq_len + 1].astype(np.int64)) for i in ix.tolist()])  # (b, S+1)
    x, y = chunk[:, :-1], chunk[:, 1:]  # (b, S) each: y is x shifted by one
    if device_type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# Model and optimizer
model_config = GPTConfig(vocab_size=meta["vocab_size"], eot_id=meta["eot_id"], seq_len=seq_len,
                         block_len=block_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
model = raw_model = GPT(model_config).to(device)  # raw_model: the plain module, for checkpoints
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]  # LayerNorm gains
groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), fused=device_type == "cuda")
iter_num, best_val_loss = 0, float("inf")
if ckpt is not None:
    now = dict(asdict(model_config), tokenizer=meta["tokenizer"])
    then = dict(ckpt["model_config"], tokenizer=ckpt["tokenizer"])
    wrong = [f"{k}={then.get(k)!r} in the checkpoint but {v!r} now" for k, v in now.items() if then.get(k) != v]
    try:
        assert not wrong
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (AssertionError, RuntimeError, ValueError, KeyError) as e:
        fail(f"checkpoint {ckpt_path} is incompatible with this run: {'; '.join(wrong) or type(e).__name__}; "
             "resume with the checkpoint's model settings and dataset, or start with --init_from=scratch")
    iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    ckpt = None  # free the memory
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
mask_id = model_config.mask_id


def forward(x, y):
    """One micro-batch through the model (always model(...), so compile and DDP see the whole forward)."""
    if objective == "ar":
        logits = model(*ar_inputs(x))  # (b, S, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return loss, loss, None
    logits = model(*tidar_inputs(x, block_len, mask_id))  # (b, 2S, V)
    return tidar_loss(logits, x, y, alpha)


@torch.no_grad()
def evaluate():
    """Val AR loss, diffusion loss, and draft accuracy by slot offset inside the block, (block_len,)."""
    generator = torch.Generator().manual_seed(seed)  # the same val batches every time: evaluations compare
    ar = diff = 0.0
    hits = torch.zeros(block_len)
    for _ in range(eval_iters):
        x, y = get_batch("val", generator)
        with autocast:
            # both objectives are scored on the doubled sequence: its AR half is exactly a causal forward
            # (TIDAR.md 4.3), and the diffusion half shows what the AR baseline cannot do
            logits = model(*tidar_inputs(x, block_len, mask_id))  # (b, 2S, V)
            _, a, d = tidar_loss(logits, x, y, alpha)
        drafts = logits[:, seq_len:].argmax(-1)  # (b, S): one-step diffusion's guess at every position
        hits += (drafts == x).view(-1, block_len).float().mean(0).cpu()  # (block_len,): by position % block_len
        ar, diff = ar + a.item(), diff + d.item()
    return ar / eval_iters, diff / eval_iters, hits / eval_iters


def get_lr(it):
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def check_finite(name, value):
    if not math.isfinite(value):  # stop before a save can overwrite the last good checkpoint
        fail(f"{name} is {value} at iter {iter_num}: training diverged; lower --lr or raise --warmup_iters "
             f"(the last good checkpoint, if any, is still {ckpt_path})")


def save_checkpoint():
    ckpt = dict(model=raw_model.state_dict(), model_config=asdict(model_config), train_config=train_config,
                tokenizer=meta["tokenizer"], iter_num=iter_num, best_val_loss=best_val_loss,
                optimizer=optimizer.state_dict())
    os.makedirs(out_dir, exist_ok=True)
    torch.save(ckpt, ckpt_path + ".tmp")
    os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: an interrupted write leaves the last checkpoint whole


# -----------------------------------------------------------------------------
# Training loop
tokens_per_iter = batch_size * grad_accum * world_size * seq_len  # clean tokens; the model sees twice as many
if master:
    n_params = sum(p.numel() for p in raw_model.parameters())
    print(f"{objective} model: {n_params / 1e6:.2f}M parameters, S={seq_len}, B={block_len}, "
          f"vocab {meta['vocab_size']} ({meta['tokenizer']}); {tokens_per_iter:,} tokens/iter "
          f"on {world_size} x {device}{' (bf16)' if device_type == 'cuda' else ''}{', compiled' if compile else ''}; "
          f"from iter {iter_num}")
    if device_type == "cpu" and not overrides:
        print("no GPU: these defaults will take many hours here; the top of train.py has a CPU run of minutes")
# data order differs across ranks, and a resumed run does not replay the batches it has already seen
generator = torch.Generator().manual_seed(seed + 1_000_003 * rank + iter_num)
x, y = get_batch("train", generator)
iter_start, t0, t_iter = iter_num, time.time(), iter_num
while True:
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        ar, diff, acc = evaluate()
        val_loss = ar if objective == "ar" else (alpha * ar + diff) / (1 + alpha)
        check_finite("val loss", val_loss)
        best_val_loss = min(best_val_loss, val_loss)
        if master:
            bpb = f", {ar / math.log(2):.3f} bits/byte" if meta["tokenizer"] == "byte" else ""
            print(f"eval {iter_num}: val loss {val_loss:.4f} (ar {ar:.4f}{bpb}; diff {diff:.4f}) | "
                  f"draft acc % by offset 0..{block_len - 1}: {' '.join(f'{100 * a:.0f}' for a in acc.tolist())}")
            if iter_num > iter_start:
                save_checkpoint()
        t0, t_iter = time.time(), iter_num  # evaluation time is not training time
    if iter_num >= max_iters:
        break

    lr_now = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr_now
    for micro_step in range(grad_accum):
        if ddp:  # average gradients across processes only once, on the last micro-step
            model.require_backward_grad_sync = micro_step == grad_accum - 1
        with autocast:
            loss, ar, diff = forward(x, y)
        x, y = get_batch("train", generator)  # fetch the next batch while the device works on this one
        (loss / grad_accum).backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    if iter_num % log_interval == 0:
        lossf = loss.item()  # the last micro-step's; .item() waits for the device, so only every few steps
        check_finite("loss", lossf)
        dt = (time.time() - t0) / (iter_num - t_iter)
        t0, t_iter = time.time(), iter_num
        if master:
            terms = f"ar {ar.item():.4f}" + (f", diff {diff.item():.4f}" if diff is not None else "")
            print(f"iter {iter_num}: loss {lossf:.4f} ({terms}), lr {lr_now:.2e}, {1000 * dt:.0f} ms/iter, "
                  f"{tokens_per_iter / dt:,.0f} tok/s")

if ddp:
    destroy_process_group()
