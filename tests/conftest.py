import os
import sys
from dataclasses import asdict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tidar import GPT, GPTConfig  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: threads only add contention (and CI has 2 cores)


@pytest.fixture
def tiny():
    """A tiny random GPT in float64 on the CPU: equivalence tests must not hide behind bf16 rounding."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=11, eot_id=10, seq_len=48, block_len=4, n_layer=2, n_head=2, n_embd=16)
    return GPT(config).double().eval()


BYTE_MODEL = GPTConfig(vocab_size=257, eot_id=256, seq_len=96, block_len=4, n_layer=1, n_head=2, n_embd=16)


def write_checkpoint(out_dir, config=BYTE_MODEL, tokenizer="byte"):
    """A checkpoint of a random model, in the format train.py writes (the parts sample.py reads)."""
    torch.manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = {"model": GPT(config).state_dict(), "model_config": asdict(config), "tokenizer": tokenizer}
    torch.save(ckpt, os.path.join(out_dir, "ckpt.pt"))


class Drafts(torch.nn.Module):
    """
    Wraps a model and overrides what its [MASK] slots say, row by row, to force the verifier's hand:
    'oracle' drafts the true next tokens (everything is accepted), 'garbage' a wrong token (everything is
    rejected), 'noisy' is right at some positions and wrong at others, 'model' leaves the row alone.
    truths: per row, the prompt and the AR model's continuation. The AR rows are untouched.
    """

    def __init__(self, model, truths, modes):
        super().__init__()
        self.model, self.config, self.truths, self.modes = model, model.config, truths, modes

    def forward(self, idx, pos, mask, cache=None):
        logits = self.model(idx, pos, mask, cache)
        pos = pos.expand(idx.shape)
        for b, t in (idx == self.config.mask_id).nonzero().tolist():
            truth, mode, p = self.truths[b], self.modes[b], int(pos[b, t])
            if mode == "model":
                continue
            right = truth[p] if p < len(truth) else 0
            wrong = mode == "garbage" or (mode == "noisy" and p in (7, 8, 13, 21, 22, 23, 27))
            logits[b, t] = -30.0
            logits[b, t, (right + 1) % self.config.vocab_size if wrong else right] = 30.0
        return logits


def random_prompt(seed, n=5):
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def scale_weights(model, factor):
    """Every weight times factor: distributions further from uniform, so that the context moves the argmax."""
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(factor)
    return model
