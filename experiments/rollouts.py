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
Python against 1.64, at k = 8), and a worse AR model than the paper's target gives in the same time (val
loss 1.533 against 1.478); so train.py keeps the paper's target. `train.py --init_from=resume` on a run made
here goes on with the paper's loss: the setting is only read here.
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
    Round r = 1 .. B-1 of rollout_labels, as a pattern (tidar.py's section 2). Query i is the newest token of
    block i+1's branch (block 0 has no prefix, so no branch). The cache holds the S clean tokens, then one
    token per branch and round: entry S + r'*m + i is branch i's token r' (m branches). A branch sees the
    clean tokens before its block and its own tokens: what plain AR decoding of that prefix sees. For S = 6,
    B = 2, round 2 (x clean; b1, b2 the branches of blocks 1 and 2, labelled by position; rows are queries):
                x0 x1 x2 x3 x4 x5 | b1 b2 | b1 b2
                                  |  2  4 |  3  5
        b1 3     #  #  .  .  .  . |  #  . |  #  .      block 1's branch: x_0 x_1, then its own tokens
        b2 5     #  #  #  #  .  . |  .  # |  .  #
    """
    m = S // B - 1  # branches
    jb = j - S  # the key's index among the branches' tokens (negative: a clean token)
    return (j < (i + 1) * B) | ((jb >= 0) & (jb % m == i) & (jb < r * m))


@torch.no_grad()  # labels, not a path for gradients: and no graph is kept for the B forwards
def rollout_labels(model, config, x):
    """
    x (N, S) clean tokens -> (N, S) labels for the masks: block b's are the B tokens that greedy AR decoding
    with the current weights writes after x_{<bB}; block 0, which has no prefix, keeps the data's.
    All blocks at once: a causal forward of x into a cache, then B - 1 forwards that each give every block's
    branch its next greedy token (S/B - 1 query tokens per row). model: the plain module.
    """
    (N, S), B = x.shape, config.block_len
    m = S // B - 1  # blocks with a prefix, so branches
    if m == 0:
        return x
    cache = KVCache(config, N, S + (B - 1) * m, x.device, next(model.parameters()).dtype)
    logits = model(x, torch.arange(S, device=x.device), causal_mask(S, n_keys=cache.max_len, device=x.device),
                   cache)  # (N, S, V)
    cache.length += S
    starts = B * torch.arange(1, m + 1, device=x.device)  # (m,): where blocks 1 .. m start
    tokens = [logits[:, starts - 1].argmax(-1)]  # (N, m): token 0 of every branch
    for r in range(1, B):
        mask = _mask(rollout_allowed, m, cache.max_len, x.device, S=S, B=B, r=r)  # (m, max_len)
        logits = model(tokens[-1], starts + r - 1, mask, cache)  # (N, m, V)
        cache.length += m
        tokens.append(logits.argmax(-1))
    # (N, S): block 0's data labels, then block 1's B rollout tokens, block 2's, ...
    return torch.cat([x[:, :B], torch.stack(tokens, -1).flatten(1)], 1)


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
    if "--help" in sys.argv or "-h" in sys.argv:  # what --rollout is; then train.py's settings
        print(__doc__)
    # train.py takes every number or string among its globals as a setting (--name=value, type-checked, saved
    # in the checkpoint, kept on resume): `rollout` is one more; its range check and training_loss are here
    train = os.path.join(ROOT, "train.py")
    run = {"__name__": "__main__", "__file__": train, "rollout": 0.0}
    guards.check_values = check_values
    tidar.training_loss = lambda *args: training_loss(*args, rollout=run["rollout"])
    with open(train) as f:
        exec(compile(f.read(), train, "exec"), run)
