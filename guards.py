"""
What keeps a train.py run from failing late or losing work, each piece one call in train.py, so that the
training itself reads top to bottom there; and, for sample.py and experiments/, the checks of a decoding
request and of the checkpoint it decodes. Every check stops the run with one line on stderr (configurator's
fail): exit status 2 for a usage error found before anything ran, 1 otherwise, 130 for Ctrl-C; except
check_request, which raises ValueError, since the decoders it guards are library functions.

    check_values, check_agreement                         the settings, alone and together
    resume_checkpoint, source_checkpoint, check_unfinished,
    load_checkpoint                                       a checkpoint to continue, or one to start from
    check_dataset_exists, read_dataset                    the dataset in data_dir
    claim_out_dir, check_disk_space                       no checkpoint replaced unasked, one writer, room
    LastCheckpoint, save_checkpoint, check_finite,
    stop_interrupted                                      what a run that stops leaves behind, and says
    check_request, load_model                             decoding: the request, the model and its tokenizer

torch is imported inside the functions that need it: `train.py --help` and a mistyped setting answer at once.
"""
import atexit
import json
import math
import os
import shutil
import sys
from dataclasses import asdict

from configurator import fail

try:
    import fcntl  # the lock on out_dir; Linux and macOS
except ImportError:  # Windows: no lock
    fcntl = None


# --- the settings


def check_values(s):
    """Each setting alone (s: train.py's globals): one line naming the setting, not a traceback later."""
    for k in ("seq_len", "block_len", "n_layer", "n_head", "n_embd", "batch_size", "grad_accum", "max_iters",
              "lr", "eval_interval", "eval_iters", "log_interval"):
        if not s[k] > 0:
            fail(f"--{k}={s[k]}: must be > 0", 2)
    for k in ("alpha", "min_lr", "warmup_iters", "weight_decay", "grad_clip", "seed", "ar_iters"):
        if not s[k] >= 0:
            fail(f"--{k}={s[k]}: must be >= 0", 2)
    for k in ("beta1", "beta2"):
        if not 0 <= s[k] < 1:
            fail(f"--{k}={s[k]}: must be in [0, 1)", 2)


def check_agreement(min_lr, lr, seq_len, block_len, objective, ar_iters, max_iters, n_embd, n_head, **_):
    """The settings that must agree with each other, as the checkpoint or the CPU preset leave them."""
    if min_lr > lr:
        fail(f"--min_lr={min_lr} is above --lr={lr}: the schedule decays from lr down to min_lr", 2)
    if seq_len % block_len:
        fail(f"--seq_len={seq_len} must be a multiple of --block_len={block_len}: training blocks tile the "
             "sequence", 2)
    if objective == "tidar" and ar_iters >= max_iters:
        fail(f"--ar_iters={ar_iters} leaves no TiDAR step in --max_iters={max_iters}: lower it (0 = TiDAR "
             "from scratch)", 2)
    if n_embd % (2 * n_head):
        fail(f"--n_embd={n_embd} must be a multiple of 2 * n_head={2 * n_head}: rotary positions need an "
             "even head size", 2)


# --- checkpoints to continue or to start from


def read_checkpoint(path, needed, instead):
    """The checkpoint of a train.py run, or one line that says what is wrong with it and what to do."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or not from train.py; "
             f"{instead}")
    missing = sorted(needed - set(ckpt)) if isinstance(ckpt, dict) else sorted(needed)
    if missing:
        fail(f"checkpoint {path} is incompatible: it lacks {', '.join(missing)}; it was not written by this "
             f"train.py; {instead}")
    return ckpt


def resume_checkpoint(path):
    """out_dir's own checkpoint, to continue (--init_from=resume)."""
    if not os.path.exists(path):
        fail(f"no checkpoint {path} to resume from: check --out_dir, or start with --init_from=scratch")
    needed = {"model", "model_config", "train_config", "tokenizer", "iter_num", "best_val_loss", "optimizer"}
    return read_checkpoint(path, needed, "move it away and start with --init_from=scratch")


def check_unfinished(path, saved_iter, max_iters):
    if saved_iter >= max_iters:
        fail(f"{path} is already at iter {saved_iter} of --max_iters={max_iters}: raise --max_iters to go on")


def source_checkpoint(init_from, source):
    """Another run's checkpoint, source = init_from/ckpt.pt, whose weights this run starts from."""
    if not os.path.isfile(source):
        fail(f"--init_from={init_from}: there is no checkpoint {source}; pass 'scratch', 'resume' or the "
             "--out_dir of a train.py run", 2)
    return read_checkpoint(source, {"model", "model_config", "train_config", "tokenizer", "iter_num"},
                           "pass the --out_dir of another train.py run")


def load_checkpoint(ckpt, path, model, optimizer, tokenizer, resume):
    """
    The checkpoint's weights into model (and, resuming, its state into optimizer), or one line that says
    what differs. Resuming, every model setting must be the checkpoint's. Starting from another run, those
    that shape the weights and give the token ids their meaning must be; S and B are this run's own (neither
    is a weight: the rotary tables are computed, and an AR model has no blocks).
    """
    now = dict(asdict(model.config), tokenizer=tokenizer)
    then = dict(ckpt["model_config"], tokenizer=ckpt["tokenizer"])
    own = () if resume else ("seq_len", "block_len")
    wrong = [f"{k}={then.get(k)!r} in the checkpoint but {v!r} now" for k, v in now.items()
             if k not in own and then.get(k) != v]
    try:
        if not wrong:
            model.load_state_dict(ckpt["model"])
            if resume:
                optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        wrong = [type(e).__name__]
    if wrong:
        fail(f"checkpoint {path} is incompatible with this run: {'; '.join(wrong)}; " +
             ("resume with the checkpoint's model settings and dataset, or start with --init_from=scratch"
              if resume else "train with its n_layer, n_head and n_embd, on a dataset of its tokenizer"))


# --- the dataset


def check_dataset_exists(data_dir, default_data):
    """Any dataset but the default (train.py prepares that one on the spot) must be there before all else."""
    if not default_data and not os.path.exists(os.path.join(data_dir, "meta.json")):
        fail(f"no dataset in {data_dir} (meta.json is missing): make one with "
             f"`python data/prepare.py --input FILE --name NAME`, then pass --data_dir=data/NAME", 2)


def read_dataset(data_dir, seq_len, default_data):
    """(vocab_size, eot_id, tokenizer) from meta.json, once train.bin and val.bin are seen to be whole."""

    def damaged(what):
        again = " (or delete the folder, and train.py prepares it again)" if default_data else ""
        fail(f"{what}: the dataset in {data_dir} is damaged or incomplete; write it again with "
             f"data/prepare.py{again}")

    meta_path = os.path.join(data_dir, "meta.json")
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
    return vocab_size, eot_id, tokenizer


# --- the output folder

lock = None  # out_dir/train.lock, open (and so locked) while the run lives


def claim_out_dir(out_dir, fresh, master):
    """
    Checked before anything slow: a fresh run never replaces a checkpoint unasked, and a folder that cannot be
    written is found now, not at the first save after minutes of training. Then rank 0 (master) holds a lock
    on out_dir/train.lock while it lives: one writer per folder. The kernel drops the lock when the process
    ends, however it ends, so a killed run leaves none stuck; the file goes at exit. A folder this run made
    goes too if it is still empty then (the run stopped before a checkpoint).
    """
    global lock
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if fresh and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} already exists: continue it with --init_from=resume, train into another "
             "--out_dir, or replace it with --overwrite=True")
    if not master:
        return
    if not os.path.exists(out_dir):
        atexit.register(lambda: os.path.isdir(out_dir) and not os.listdir(out_dir) and os.rmdir(out_dir))
    lock_path = os.path.join(out_dir, "train.lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(lock_path, "a+")  # and so out_dir can be written: found now, not at the first save
    except OSError as e:
        fail(f"cannot write to --out_dir={out_dir} ({e.strerror or e}): pick a folder you can write to")
    if fcntl is None:  # Windows: no lock
        lock.close()
        os.remove(lock_path)
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # removed by a run that ended while this one opened it: not the file the next run will see
        if not os.path.samestat(os.fstat(lock.fileno()), os.stat(lock_path)):
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        lock.seek(0)
        fail(f"another train.py (pid {lock.read().strip() or '?'}) is training into --out_dir={out_dir}: "
             "wait for it to end, or pick another --out_dir")
    atexit.register(os.remove, lock_path)  # while still locked: no other run can take this file meanwhile
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()


def check_disk_space(out_dir, n_params):
    """A new checkpoint (float32 weights and AdamW's two moments) is written beside the old one."""
    ckpt_bytes = 3 * 4 * n_params
    if (free := shutil.disk_usage(out_dir).free) < ckpt_bytes:
        fail(f"--out_dir={out_dir} has {free / 1e6:.0f} MB free, and a checkpoint needs about "
             f"{ckpt_bytes / 1e6:.0f} MB: free some space or pick another --out_dir")


# --- what a run that stops leaves, and says


class LastCheckpoint:
    """The run's last good checkpoint, path at iter_num (None while there is none), as lines name it."""

    def __init__(self, path, iter_num):
        self.path, self.iter_num = path, iter_num

    def __str__(self):
        if self.iter_num is None:
            return "no checkpoint was written"
        return f"the last checkpoint is {self.path} (iter {self.iter_num})"


def save_checkpoint(ckpt, last):
    """
    ckpt to last.path, written to a temporary file and renamed: an interrupted write (Ctrl-C, a full disk)
    leaves the last checkpoint whole, and no half file. last follows.
    """
    import torch

    tmp = last.path + ".tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, last.path)  # atomic
        last.iter_num = ckpt["iter_num"]
    except OSError as e:  # a full disk, say
        fail(f"cannot save {last.path} at iter {ckpt['iter_num']} ({e.strerror or e}); {last}, untouched: "
             "free some space (or pick another --out_dir) and continue with --init_from=resume")
    finally:
        if os.path.exists(tmp):  # half a file, after a failure or Ctrl-C
            os.remove(tmp)


def check_finite(name, value, iter_num, last):
    if not math.isfinite(value):  # stop before a save can overwrite the last good checkpoint
        fail(f"{name} is {value} at iter {iter_num}: training diverged; lower --lr or raise --warmup_iters "
             f"({last})")


def stop_interrupted(where, last, master):
    """Ctrl-C: one line and exit status 130; whatever was being written has been removed by then."""
    if master:  # torchrun passes Ctrl-C to every process
        print(f"train.py: interrupted {where}; {last}", file=sys.stderr)
    sys.exit(130)


# --- decoding: sample.py and experiments/


def check_request(config, prompts, max_new_tokens, temperature, top_k, room=0, k=1, beta=1.0,
                  rule="lossless"):
    """Bad requests fail before decoding starts, each with a message that says what to change. room: the
    positions a step reaches past the last token (2k for TiDAR: its last block ends at L + 2k - 1)."""
    import torch

    ids, V, S, P = [t for p in prompts for t in p], config.vocab_size, config.seq_len, max(map(len, prompts))
    drafts, or_k = (f" + room for the drafts ({room})", ", or use a smaller draft_len") if room else ("", "")
    fix = (f"use max_new_tokens <= {S - P - room}" if S - P - room >= 1 else
           "use a smaller draft_len: its room alone fills the context" if room >= S - 1 else
           f"shorten the prompt to {S - 1 - room} tokens or fewer{or_k}")
    for ok, message in [  # checked in order: the first that fails is the error
        (all(isinstance(t, int) and 0 <= t < V for t in ids),  # [MASK] (id V) is no prompt token
         f"prompt token ids must be ints in [0, {V}), got {min(ids)}..{max(ids)}"),
        (k >= 1, f"draft_len must be at least 1, got {k}"),
        (max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {max_new_tokens}"),
        (0 <= temperature < math.inf, f"temperature must be a number >= 0 (0 = greedy), got {temperature}"),
        (not 0 < temperature < torch.finfo(torch.float32).tiny,
         f"temperature {temperature} is too small to divide by in float32: use 0 for greedy"),
        (top_k is None or top_k >= 1, f"top_k must be at least 1 (or unset), got {top_k}"),
        (0 <= beta <= 1, f"beta must lie in [0, 1], got {beta}"),
        (rule in ("lossless", "paper"), f"rule must be 'lossless' or 'paper', got {rule!r}"),
        (P + max_new_tokens + room <= S, f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}){drafts} = "
         f"{P + max_new_tokens + room} exceeds the model's context of {S}: {fix}"),
    ]:
        if not ok:
            raise ValueError(message)


def load_model(out_dir, device, dtype=None):
    """The model of out_dir/ckpt.pt (in dtype, float32 by default) and its tokenizer, or one line that says
    what is wrong."""
    import torch

    from data.prepare import get_tokenizer
    from tidar import GPT, GPTConfig

    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}: train one first with `python train.py` (or pass --out_dir)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # (torch's own message advises weights_only=False: not what to do here)
        fail(f"cannot load {path} ({type(e).__name__}): it is damaged, or not a checkpoint of this version's "
             "train.py; retrain, or pick another --out_dir")
    try:
        enc = get_tokenizer(ckpt["tokenizer"])
    except (RuntimeError, ValueError) as e:  # gpt2's vocabulary could not be downloaded, say
        fail(str(e))
    config = model.config
    if (enc.n_vocab, enc.eot_token) != (config.vocab_size, config.eot_id):
        fail(f"{path} was trained on {config.vocab_size} tokens with <|endoftext|> = {config.eot_id}, but "
             f"tokenizer {ckpt['tokenizer']!r} has {enc.n_vocab} and {enc.eot_token}: the checkpoint does "
             "not match its tokenizer")
    return model.to(device, dtype or torch.float32).eval(), enc
