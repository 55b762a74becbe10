import os
import sys
from pathlib import Path

# no hub here: a model id fails at once instead of after retries. Set before transformers (and huggingface_hub)
# are imported, which read it once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import sft  # noqa: E402

# CI (CI=true) replays the same examples every run, so a property test cannot pass one day and fail the next.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A randomly initialised tiny char-level GPT-2 saved with save_pretrained, loaded like any HF checkpoint."""
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    model = sft.build_tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    path = tmp_path_factory.mktemp("tiny") / "checkpoint"
    common.save_model(model, tokenizer, str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(architecture, tokenizer): a randomly initialised 2-layer `gpt2`, or `llama` (rotary positions,
    grouped-query attention), so that code meant for any causal LM is checked on two architectures."""

    def build(architecture: str, tokenizer):
        if architecture == "gpt2":
            return sft.build_tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(config)

    return build


@pytest.fixture
def logged_scalars(monkeypatch):
    """{(tag, step): value} of every scalar the script under test logs: common.setup_logging returns a recorder."""
    logged = {}

    class Recorder:
        def add_scalar(self, tag, value, step):
            logged[(tag, step)] = value

        def __getattr__(self, name):  # add_text, close, ...: nothing to keep
            return lambda *args, **kwargs: None

    monkeypatch.setattr(common, "setup_logging", lambda *args, **kwargs: Recorder())
    return logged
