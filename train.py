"""
Train a TiDAR model (or, with --objective=ar, the plain AR baseline) on the tokens in data_dir.

    python train.py                                    # one process, whatever device is there
    torchrun --standalone --nproc_per_node=8 train.py  # DDP: nccl on CUDA, gloo on CPU
    python train.py --init_from=resume                 # continue out_dir/ckpt.pt where it stopped
    python train.py --objective=ar --out_dir=out-ar    # the paper's recipe: an AR model first ...
    python train.py --init_from=out-ar                 # ... then TiDAR from its weights (continual pretraining)
    python train.py --help                             # the settings, their defaults and valid values

Every setting below can be overridden with --name=value. The defaults are sized for one GPU; with no GPU
a fresh run takes the smaller cpu_preset instead (settings given on the command line still win over it).
"""
import atexit
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

from configurator import fail, parse_overrides, quiet_exits

try:
    import fcntl  # the lock on out_dir (below); Linux and macOS
except ImportError:  # Windows: no lock
    fcntl = None

# Ctrl-C while starting: one line (the loop and the data preparation catch theirs); so is `--help | head`
sys.excepthook = quiet_exits(" before training started; nothing was written")

# -----------------------------------------------------------------------------
# Settings. The defaults are sized for one GPU: 25.4M parameters, 6000 steps of 32 sequences of 1024 tokens, the
# first 4000 plain AR and the rest TiDAR from those weights (the paper's recipe), bf16, compiled.
out_dir = "out"  # holds ckpt.pt
overwrite = False  # False: a fresh run refuses to replace out_dir/ckpt.pt | True: it may
data_dir = "data/pycode"  # from data/prepare.py; a missing folder named pycode is prepared on the spot
objective = "tidar"  # 'tidar' (doubled sequence, AR + diffusion loss) | 'ar' (plain AR baseline, same data)
ar_iters = 4000  # 0 .. max_iters - 1: the first steps train plain AR, then TiDAR from them; 0 = TiDAR from scratch
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
init_from = "scratch"  # 'scratch' | 'resume' (out_dir/ckpt.pt: its settings, iteration count and schedule) | DIR
# (DIR: another run's folder, say an AR baseline's: start from its weights, with this run's settings, a fresh
# optimizer and schedule; the model's shape and tokenizer must be the checkpoint's)
device = "auto"  # 'auto' (cuda, then mps, then cpu) | 'cuda' | 'mps' | 'cpu'
compile = "auto"  # 'auto' (on with CUDA, where torch.compile works) | True | False
seed = 1337  # >= 0; fixes the initialisation and every batch
# With no GPU (the device resolves to cpu) a fresh run takes these values instead, except those set on the
# command line: 3800 AR steps, then 1400 TiDAR steps, in about the time of 2800 TiDAR steps from scratch (an AR
# step costs about 0.4 of one here), for a far better AR loss and drafts as good (README, "Continual pretraining").
# Measured on 2 cores of an AMD EPYC, torch 2.14.1: 13 to 14 min (98-115 ms per AR step, 256-266 per TiDAR step).
# Time on the CPU goes to the doubled sequence's attention; the shape, context and learning rate were chosen
# by short runs of equal time.
cpu_preset = dict(n_layer=4, n_head=2, n_embd=128, seq_len=256, block_len=8, batch_size=6, ar_iters=3800,
                  max_iters=5200, warmup_iters=100, lr=2e-3, min_lr=2e-4, eval_interval=950, eval_iters=20)
# -----------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
choices = dict(objective=("tidar", "ar"), device=("auto", "cuda", "mps", "cpu"), compile=("auto", True, False))
overrides = parse_overrides(sys.argv[1:], settings, choices, __file__, cpu_preset)
globals().update(overrides)
# A bad value stops here, with one line naming the setting, rather than as a traceback or a silent mistake later.
for k in ("seq_len", "block_len", "n_layer", "n_head", "n_embd", "batch_size", "grad_accum", "max_iters", "lr",
          "eval_interval", "eval_iters", "log_interval"):
    if not globals()[k] > 0:
        fail(f"--{k}={globals()[k]}: must be > 0", 2)
for k in ("alpha", "min_lr", "warmup_iters", "weight_decay", "grad_clip", "seed", "ar_iters"):
    if not globals()[k] >= 0:
        fail(f"--{k}={globals()[k]}: must be >= 0", 2)
for k in ("beta1", "beta2"):
    if not 0 <= globals()[k] < 1:
        fail(f"--{k}={globals()[k]}: must be in [0, 1)", 2)

# torch only now: --help and a mistyped setting answer at once, not after the second that importing it takes
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tidar import GPT, GPTConfig, evaluate_batch, pick_device, training_loss  # noqa: E402

try:
    device_type = pick_device(device)  # 'cuda' | 'mps' | 'cpu'
except ValueError as e:
    fail(str(e), 2)

ckpt_path = os.path.join(out_dir, "ckpt.pt")
resume, from_run = init_from == "resume", init_from not in ("scratch", "resume")
ckpt = saved_iter = started_from = None  # saved_iter: the iteration of the last checkpoint in out_dir, if any


def read_checkpoint(path, needed, instead):
    """The checkpoint of a train.py run, or one line that says what is wrong with it and what to do instead."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or not from train.py; {instead}")
    missing = sorted(needed - set(ckpt)) if isinstance(ckpt, dict) else sorted(needed)
    if missing:
        fail(f"checkpoint {path} is incompatible: it lacks {', '.join(missing)}; it was not written by this "
             f"train.py; {instead}")
    return ckpt


if resume:
    if not os.path.exists(ckpt_path):
        fail(f"no checkpoint {ckpt_path} to resume from: check --out_dir, or start with --init_from=scratch")
    ckpt = read_checkpoint(ckpt_path, {"model", "model_config", "train_config", "tokenizer", "iter_num",
                                       "best_val_loss", "optimizer"}, "move it away and start with --init_from=scratch")
    # Resume with the run's own settings (so the same schedule), then whatever the command line says.
    # The machine-specific ones stay as given here.
    keep = {"out_dir", "overwrite", "init_from", "device", "compile"} | set(overrides)
    globals().update({k: v for k, v in ckpt["train_config"].items() if k in settings and k not in keep})
    saved_iter, started_from = ckpt["iter_num"], ckpt.get("started_from")
    if saved_iter >= max_iters:
        fail(f"{ckpt_path} is already at iter {saved_iter} of --max_iters={max_iters}: raise --max_iters to go on")
elif from_run:  # continual pretraining (README, "Continual pretraining"): another run's weights, this run's all else
    source = os.path.join(init_from, "ckpt.pt")
    if not os.path.isfile(source):
        fail(f"--init_from={init_from}: there is no checkpoint {source}; pass 'scratch', 'resume' or the --out_dir "
             "of a train.py run", 2)
    ckpt = read_checkpoint(source, {"model", "model_config", "train_config", "tokenizer", "iter_num"},
                           "pass the --out_dir of another train.py run")
    started_from = dict(checkpoint=os.path.abspath(source), objective=ckpt["train_config"].get("objective"),
                        iter_num=ckpt["iter_num"])
cpu_run = not resume and device_type == "cpu"
if cpu_run:
    globals().update({k: v for k, v in cpu_preset.items() if k not in overrides})
if from_run and "ar_iters" not in overrides:  # the weights are trained already: straight to the objective
    ar_iters = 0
train_config = {k: globals()[k] for k in settings}
# settings that must agree with each other, as the checkpoint or the CPU preset leave them
if min_lr > lr:
    fail(f"--min_lr={min_lr} is above --lr={lr}: the schedule decays from lr down to min_lr", 2)
if seq_len % block_len:
    fail(f"--seq_len={seq_len} must be a multiple of --block_len={block_len}: training blocks tile the sequence", 2)
if objective == "tidar" and ar_iters >= max_iters:
    fail(f"--ar_iters={ar_iters} leaves no TiDAR step in --max_iters={max_iters}: lower it (0 = TiDAR from "
         "scratch)", 2)
if n_embd % (2 * n_head):
    fail(f"--n_embd={n_embd} must be a multiple of 2 * n_head={2 * n_head}: rotary positions need an even head size", 2)
if data_dir == "data/pycode":  # the default dataset lives beside train.py, wherever train.py is started from
    data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), data_dir)
meta_path = os.path.join(data_dir, "meta.json")
default_data = os.path.basename(os.path.normpath(data_dir)) == "pycode"  # prepared on the spot when missing
if not default_data and not os.path.exists(meta_path):
    fail(f"no dataset in {data_dir} (meta.json is missing): make one with "
         f"`python data/prepare.py --input FILE --name NAME`, then pass --data_dir=data/NAME", 2)

# -----------------------------------------------------------------------------
# Processes and output. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python train.py` is rank 0 of 1.
rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
world_size = int(os.environ.get("WORLD_SIZE", 1))
ddp, master = world_size > 1, rank == 0
# The output folder is checked before anything slow: a fresh run never replaces a checkpoint unasked, and a
# folder that cannot be written is found now, not at the first save after minutes of training.
if not resume and os.path.exists(ckpt_path) and not overwrite:
    fail(f"{ckpt_path} already exists: continue it with --init_from=resume, train into another --out_dir, "
         "or replace it with --overwrite=True")
if master:
    if not os.path.exists(out_dir):  # made by this run: if it stops before a checkpoint, no empty folder is left
        atexit.register(lambda: os.path.isdir(out_dir) and not os.listdir(out_dir) and os.rmdir(out_dir))
    # One writer per folder: this run holds a lock on out_dir/train.lock while it lives. The kernel drops the
    # lock when the process ends, however it ends, so a killed run leaves none stuck; the file goes at exit.
    lock_path = os.path.join(out_dir, "train.lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(lock_path, "a+")  # and so out_dir can be written: found now, not at the first save
    except OSError as e:
        fail(f"cannot write to --out_dir={out_dir} ({e.strerror or e}): pick a folder you can write to")
    if fcntl is None:  # Windows: no lock
        lock.close()
        os.remove(lock_path)
    else:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(lock.fileno()), os.stat(lock_path)):  # removed by a run that ended
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            lock.seek(0)
            fail(f"another train.py (pid {lock.read().strip() or '?'}) is training into --out_dir={out_dir}: "
                 "wait for it to end, or pick another --out_dir")
        atexit.register(os.remove, lock_path)  # while still locked: no other run can take this file meanwhile
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    if cpu_run:
        preset = " ".join(f"{k}={globals()[k]}" for k in cpu_preset)
        as_measured = not set(overrides) & {*cpu_preset, "objective", "grad_accum", "init_from"}
        how_long = "as set, it takes about 14 minutes on 2 cores" if as_measured else "the log shows the time left"
        two_stages = ar_iters and objective == "tidar"
        stages = f"{ar_iters} AR steps, then {max_iters - ar_iters} TiDAR steps from them; " if two_stages else ""
        print(f"no GPU: training the CPU preset instead of the GPU defaults ({preset}); {stages}{how_long}; "
              "--help lists the settings", flush=True)


def last_checkpoint():
    return f"the last checkpoint is {ckpt_path} (iter {saved_iter})" if saved_iter is not None else \
        "no checkpoint was written"


def stop_interrupted(where):
    """Ctrl-C: one line and exit status 130; whatever was being written has been removed by then."""
    if master:  # torchrun passes Ctrl-C to every process
        print(f"train.py: interrupted {where}; {last_checkpoint()}", file=sys.stderr)
    sys.exit(130)


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
flex = compile and device_type == "cuda"  # FlexAttention BlockMasks: fused only when compiled, no CPU backward
torch.manual_seed(seed)

# -----------------------------------------------------------------------------
# Data: one long stream of token ids per split; a batch is N = batch_size random windows of S + 1 tokens.
if not os.path.exists(meta_path):  # the default dataset, not prepared yet
    if master:
        from data.prepare import prepare_pycode

        print(f"preparing the default dataset in {data_dir}: the .py sources of the standard library, torch, numpy "
              "and tiktoken (a few seconds)...", flush=True)
        try:
            m = prepare_pycode(data_dir)
        except KeyboardInterrupt:
            stop_interrupted(f"while preparing {data_dir} (nothing of it was kept; the next run prepares it again)")
        except OSError as e:
            fail(f"cannot prepare {data_dir}: {e}")
        print(f"{m['n_files']} files, {m['train_tokens']:,} train and {m['val_tokens']:,} val tokens")
    if ddp:
        barrier()


def damaged(what):
    fail(f"{what}: the dataset in {data_dir} is damaged or incomplete; write it again with data/prepare.py" +
         (" (or delete the folder, and train.py prepares it again)" if default_data else ""))


try:
    with open(meta_path) as f:
        meta = json.load(f)
    vocab_size, eot_id, tokenizer = int(meta["vocab_size"]), int(meta["eot_id"]), str(meta["tokenizer"])
except (ValueError, KeyError, TypeError):
    damaged(f"{meta_path} is not a complete meta.json")
for split in ("train", "val"):
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        damaged(f"{path} is missing")
    if os.path.getsize(path) % 2:
        damaged(f"{path} ends in half a token (an odd number of bytes)")
    if (n := os.path.getsize(path) // 2) <= seq_len:
        fail(f"{path} holds {n} tokens, fewer than seq_len + 1 = {seq_len + 1}: " +
             (f"lower --seq_len to {n - 1} or less" if n > 1 else "prepare the dataset from more text"))


def get_batch(split, *key):
    """
    x (N, S) and y (N, S), y being x shifted by one, from N random windows of one split. The windows are a
    function of (seed, split, key) alone (choice): in training key = (rank, n) for this process's n-th
    micro-batch, so a resumed run draws exactly the batches the uninterrupted run would have, and nothing
    about the data order needs saving; key = (i,) gives the i-th val batch, the same at every evaluation.
    """
    # a fresh memmap every batch: a long-lived one keeps the pages it touched (nanoGPT does the same)
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    starts = np.random.default_rng([seed, split == "val", *key]).integers(len(data) - seq_len, size=batch_size)
    chunk = torch.from_numpy(np.stack([data[i : i + seq_len + 1] for i in starts]).astype(np.int64))  # (N, S+1)
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
    # Resuming, every model setting is the checkpoint's. Starting from another run, those that shape the weights
    # and give the token ids their meaning must be; S and B are this run's own (neither is a weight: the
    # rotary tables are computed, and an AR model has no blocks).
    now = dict(asdict(model_config), tokenizer=tokenizer)
    then = dict(ckpt["model_config"], tokenizer=ckpt["tokenizer"])
    own = () if resume else ("seq_len", "block_len")
    wrong = [f"{k}={then.get(k)!r} in the checkpoint but {v!r} now" for k, v in now.items()
             if k not in own and then.get(k) != v]
    try:
        if not wrong:
            # From an AR model, the [MASK] row of the embedding starts as that checkpoint holds it: its random
            # initialisation, shrunk by weight decay, as AR training never feeds a [MASK] and never gave it a
            # gradient. A small random vector is how every other row started; the diffusion loss trains it
            # from the first step.
            raw_model.load_state_dict(ckpt["model"])
            if resume:
                optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        wrong = [type(e).__name__]
    if wrong:
        fail(f"checkpoint {ckpt_path if resume else source} is incompatible with this run: {'; '.join(wrong)}; " +
             ("resume with the checkpoint's model settings and dataset, or start with --init_from=scratch" if resume
              else "train with its n_layer, n_head and n_embd, on a dataset of its tokenizer"))
    if resume:
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    ckpt = None  # free the memory
n_params = sum(p.numel() for p in raw_model.parameters())
ckpt_bytes = 3 * 4 * n_params  # float32 weights and AdamW's two moments
if master and (free := shutil.disk_usage(out_dir).free) < ckpt_bytes:  # a new checkpoint is written beside the old
    fail(f"--out_dir={out_dir} has {free / 1e6:.0f} MB free, and a checkpoint needs about {ckpt_bytes / 1e6:.0f} MB: "
         "free some space or pick another --out_dir")
if compile:
    model = torch.compile(model, dynamic=False)  # evaluation's doubled length gets its own graph, not a dynamic one
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)


def evaluate():
    """Val AR loss, diffusion loss, and draft accuracy by offset inside the block, (block_len,)."""
    ar = diff = 0.0
    hits = torch.zeros(block_len)
    for i in range(eval_iters):
        x, y = get_batch("val", i)
        with autocast:
            a, d, h = evaluate_batch(model, model_config, x, y, flex)  # the AR baseline's diffusion half too
        ar, diff, hits = ar + a, diff + d, hits + h
    return ar / eval_iters, diff / eval_iters, hits / eval_iters


def get_lr(it):
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def check_finite(name, value):
    if not math.isfinite(value):  # stop before a save can overwrite the last good checkpoint
        fail(f"{name} is {value} at iter {iter_num}: training diverged; lower --lr or raise --warmup_iters "
             f"({last_checkpoint()})")


def save_checkpoint():
    global saved_iter
    ckpt = dict(model=raw_model.state_dict(), model_config=asdict(model_config), train_config=train_config,
                tokenizer=tokenizer, iter_num=iter_num, best_val_loss=best_val_loss, optimizer=optimizer.state_dict(),
                started_from=started_from)
    tmp = ckpt_path + ".tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, ckpt_path)  # atomic: an interrupted write leaves the last checkpoint whole
        saved_iter = iter_num
    except OSError as e:  # a full disk, say
        fail(f"cannot save {ckpt_path} at iter {iter_num} ({e.strerror or e}); {last_checkpoint()}, untouched: "
             "free some space (or pick another --out_dir) and continue with --init_from=resume")
    finally:
        if os.path.exists(tmp):  # half a file, after a failure or Ctrl-C
            os.remove(tmp)


# -----------------------------------------------------------------------------
# Training loop
tokens_per_iter = batch_size * grad_accum * world_size * seq_len  # clean tokens; the model sees twice as many
if master:
    if from_run:
        untrained = "; an AR model never trained its [MASK] embedding" if started_from["objective"] == "ar" else ""
        kind = "an AR" if started_from["objective"] == "ar" else "a TiDAR"
        print(f"starting from the weights of {source} ({kind} run at iter {started_from['iter_num']}), with a fresh "
              f"optimizer and schedule{untrained}", flush=True)
    threads = f" (threads: {torch.get_num_threads()})"  # OMP_NUM_THREADS sets it
    how = " (bf16)" if device_type == "cuda" else threads if device_type == "cpu" else ""
    if objective == "tidar" and ar_iters > iter_num:
        print(f"steps {iter_num}..{ar_iters - 1} train plain AR, steps {ar_iters}..{max_iters - 1} TiDAR from those "
              "weights (continual pretraining, the paper's recipe; --ar_iters=0 trains TiDAR from scratch)", flush=True)
    print(f"{objective} model: {n_params / 1e6:.2f}M parameters, S={seq_len}, B={block_len}, "
          f"vocab {vocab_size} ({tokenizer}); {tokens_per_iter:,} tokens/iter "
          f"on {world_size} x {device}{how}{', compiled' if compile else ''}; from iter {iter_num}", flush=True)
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
            check_finite("val loss", val_loss)
            best_val_loss = min(best_val_loss, val_loss)
            if master:
                bpb = f", {ar / math.log(2):.3f} bits/byte" if tokenizer == "byte" else ""
                print(f"eval {iter_num}: val loss {val_loss:.4f} (ar {ar:.4f}{bpb}; diff {diff:.4f}) | draft acc % "
                      f"by offset 0..{block_len - 1}: {' '.join(f'{100 * a:.0f}' for a in acc.tolist())}", flush=True)
                if iter_num > iter_start:
                    save_checkpoint()
            t0, t_iter = time.time(), iter_num  # evaluation time is not training time
            eval_time = t0 - t_eval
        if iter_num >= max_iters:
            break

        lr_now = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        for micro_step in range(grad_accum):
            if ddp:  # average gradients across processes only once, on the last micro-step
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with autocast:
                loss, ar, diff = training_loss(model, model_config, x, y, "ar" if iter_num < ar_iters else objective,
                                               alpha, flex)
            # fetch the next micro-batch while the device works on this one
            x, y = get_batch("train", rank, iter_num * grad_accum + micro_step + 1)
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
            # In the AR stage the time left is that stage's: a TiDAR step's cost is not known before one has run.
            end = ar_iters if objective == "tidar" and iter_num < ar_iters else max_iters
            evals_left = end // eval_interval - iter_num // eval_interval + (end == max_iters and end % eval_interval > 0)
            left = dt * (end - iter_num) + evals_left * eval_time
            then = f" of the AR stage, then {max_iters - end} TiDAR steps" if end < max_iters else ""
            t0, t_iter = time.time(), iter_num
            if master:
                terms = f"ar {ar.item():.4f}" + (f", diff {diff.item():.4f}" if diff is not None else "")
                print(f"iter {iter_num}: loss {lossf:.4f} ({terms}), lr {lr_now:.2e}, {1000 * dt:.0f} ms/iter, "
                      f"{tokens_per_iter / dt:,.0f} tok/s, {int(left) // 60}m{int(left) % 60:02d}s left{then}",
                      flush=True)
except KeyboardInterrupt:
    stop_interrupted(f"at iter {iter_num}")
if master:
    took = int(time.time() - t_start)
    print(f"done: iters {iter_start}..{iter_num} in {took // 60}m{took % 60:02d}s; {last_checkpoint()}; decode it "
          f"with `python sample.py --out_dir={out_dir} --prompt ...`", flush=True)

if ddp:
    destroy_process_group()
