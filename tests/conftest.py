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
