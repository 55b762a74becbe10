import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: a model id fails at once instead of after retries
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

# CI (CI=true) replays the same examples every run, so a property test cannot pass one day and fail the next.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A randomly initialised tiny char-level GPT-2 saved with save_pretrained, loaded like any HF checkpoint."""
    torch.manual_seed(0)
    tokenizer = common.build_tiny_tokenizer()
    model = common.build_tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    path = tmp_path_factory.mktemp("tiny") / "checkpoint"
    common.save_checkpoint(model, tokenizer, str(path))
    return str(path)
