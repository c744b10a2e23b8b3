import os
import sys

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
