import os
import signal
import sys
from contextlib import contextmanager
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


class ScalarRecorder:
    """TensorBoard stand-in: every scalar kept in `.logged`; logging (tag, step) `interrupt_at` sends a real SIGINT."""

    def __init__(self, interrupt_at: tuple[str, int] | None = None):
        self.logged, self.interrupt_at = {}, interrupt_at

    def add_scalar(self, tag, value, step):
        self.logged[(tag, step)] = value
        if (tag, step) == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)

    def __getattr__(self, name):  # add_text, close, ...: nothing to keep
        return lambda *args, **kwargs: None


@pytest.fixture
def record_run(monkeypatch):
    """record_run(interrupt_at=None) -> {(tag, step): value} that the runs from now to the next call log."""

    def record(interrupt_at: tuple[str, int] | None = None) -> dict:
        recorder = ScalarRecorder(interrupt_at)
        monkeypatch.setattr(common, "setup_logging", lambda *args, **kwargs: recorder)
        return recorder.logged

    return record


@pytest.fixture
def logged_scalars(record_run):
    """{(tag, step): value} of every scalar the script under test logs: common.setup_logging returns a recorder."""
    return record_run()


@pytest.fixture(scope="session")
def users_file():
    """users_file(path, text="mine") -> path: a file of the user's, its folder made, that no script may change."""

    def write(path: Path, text: str = "mine") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def refused_keeping():
    """with refused_keeping(path, match): the block raises a ValueError matching `match`; the file at path unchanged."""

    @contextmanager
    def refused(path: Path, match: str):
        text = path.read_text()
        with pytest.raises(ValueError, match=match) as error:
            yield error
        assert path.read_text() == text

    return refused
