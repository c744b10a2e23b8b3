"""
train.py as it is, with the masks trained toward the model's own greedy rollouts instead of the data: an
ablation beyond the paper (RESULTS.md, "Beyond the paper: the masks trained toward the model's own greedy
text").

    python experiments/rollouts.py --init_from=resume --out_dir=out-rollout --rollout=1  # or any setting

--rollout, from 0 to 1 (default 0, train.py's own loss, the paper's), weighs the new target in the diffusion
term: (1 - rollout) * CE(data) + rollout * CE(rollouts). Why try it: a greedy draft at offset j of its block
is accepted exactly when it is token j of the greedy continuation of the block's prefix (README, "Decoding:
one forward per step"), while the data token there is one noisy sample, conditioned on nothing the model
says. What it gave on the quick start's model: far better greedy drafts (2.56 tokens per forward on unseen
Python against 1.64), and a worse AR model than the paper's target gives in the same time (val loss 1.533
against 1.478); so train.py keeps the paper's target.
"""
import os
import sys

# Run from anywhere: train.py and the modules it uses sit in the repository's root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import guards  # noqa: E402
import tidar  # noqa: E402
from configurator import fail  # noqa: E402
from tidar import KVCache, _mask, causal_mask, tidar_inputs, tidar_loss  # noqa: E402

papers_training_loss = tidar.training_loss


def rollout_allowed(i, j, S, B, r):
    """
    Round r = 1 .. B-1 of rollout_labels, as a pattern (tidar.py's section 2): query i is the newest token of
    block i+1's branch (block 0 has no prefix, so no branch). Keys: the S clean tokens, then one token per
    branch for each round so far. A branch sees the clean tokens before its block and its own tokens: what
    plain AR decoding of that prefix sees.
    """
    n = S // B - 1  # branches
    jb = j - S  # the key's index among the branches' tokens (negative: a clean token)
    return (j < (i + 1) * B) | ((jb >= 0) & (jb % n == i) & (jb < r * n))


@torch.no_grad()  # labels, not a path for gradients: and no graph is kept for the B forwards
def rollout_labels(model, config, x):
    """
    x (N, S) clean tokens -> (N, S) labels for the masks: block b's are the B tokens that greedy AR decoding
    with the current weights writes after x_{<bB}; block 0, which has no prefix, keeps the data's.
    All blocks at once: a causal forward of x into a cache, then B - 1 forwards that each give every block's
    branch its next greedy token (S/B - 1 query tokens per row). model: the plain module.
    """
    (N, S), B = x.shape, config.block_len
    n = S // B - 1  # blocks with a prefix
    if n == 0:
        return x
    cache = KVCache(config, N, S + (B - 1) * n, x.device, next(model.parameters()).dtype)
    logits = model(x, torch.arange(S, device=x.device), causal_mask(S, n_keys=cache.max_len, device=x.device),
                   cache)  # (N, S, V)
    cache.length += S
    starts = B * torch.arange(1, n + 1, device=x.device)  # (n,): where blocks 1 .. n start
    tokens = [logits[:, starts - 1].argmax(-1)]  # (N, n): token 0 of every branch
    for r in range(1, B):
        mask = _mask(rollout_allowed, n, cache.max_len, x.device, S=S, B=B, r=r)  # (n, max_len)
        logits = model(tokens[-1], starts + r - 1, mask, cache)  # (N, n, V)
        cache.length += n
        tokens.append(logits.argmax(-1))
    return torch.cat([x[:, :B], torch.stack(tokens, -1).flatten(1)], 1)  # (N, S): block 1's B, block 2's ...


def training_loss(model, config, x, y, objective="tidar", alpha=1.0, flex=False, rollout=0.0):
    """tidar.training_loss, with the diffusion term leaning toward the rollouts by `rollout` (0: the same)."""
    if objective == "ar" or rollout == 0:
        return papers_training_loss(model, config, x, y, objective, alpha, flex)
    logits = model(*tidar_inputs(x, config.block_len, config.mask_id, flex))  # (N, 2S, V)
    _, ar, diff = tidar_loss(logits, x, y, alpha)
    plain = getattr(model, "module", model)  # the module inside DDP, then inside torch.compile
    own = rollout_labels(getattr(plain, "_orig_mod", plain), config, x)
    masks = logits[:, x.size(1) :].flatten(0, 1)  # (N*S, V)
    diff = (1 - rollout) * diff + rollout * F.cross_entropy(masks, own.flatten())
    return (alpha * ar + diff) / (1 + alpha), ar, diff


def check_values(s, papers=guards.check_values):
    papers(s)
    if not 0 <= s["rollout"] <= 1:
        fail(f"--rollout={s['rollout']}: must be in [0, 1]", 2)


if __name__ == "__main__":
    # train.py takes every number or string among its globals as a setting (--name=value, type-checked, saved
    # in the checkpoint, kept on resume): `rollout` is one more; its range check and training_loss are here
    train = os.path.join(ROOT, "train.py")
    run = {"__name__": "__main__", "__file__": train, "rollout": 0.0}
    guards.check_values = check_values
    tidar.training_loss = lambda *args: training_loss(*args, rollout=run["rollout"])
    with open(train) as f:
        exec(compile(f.read(), train, "exec"), run)
