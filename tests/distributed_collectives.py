# Run by tests/test_distributed.py under torchrun with 2 processes (not collected by pytest): each process holds half
# of a fixed batch, and the helpers of common.py must give what one process computes on the whole batch.
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import ppo  # noqa: E402
import sft  # noqa: E402

PROBLEMS = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]


def main() -> None:
    rank, world_size, _ = common.setup_distributed("cpu")
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(8, 5, generator=generator)
    mask = (torch.rand(8, 5, generator=generator) > 0.3).float()
    mine = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)

    torch.testing.assert_close(common.all_gather(values[mine]), values)
    torch.testing.assert_close(common.all_reduce_sum(mask[mine].sum()), mask.sum())
    count = mask.sum()  # whole-batch statistics, computed here by hand
    mean = (values * mask).sum() / count
    std = (((values - mean) ** 2 * mask).sum() / (count - 1) + 1e-8).sqrt()
    for shift_mean in (True, False):
        expected = ((values - mean) / std + (0.0 if shift_mean else mean)) * mask
        torch.testing.assert_close(ppo.masked_whiten(values[mine], mask[mine], shift_mean=shift_mean), expected[mine])

    # sharded greedy evaluation: 5 problems, 3 on rank 0 and 2 on rank 1; every rank gets all completions, in order
    tokenizer = sft.build_tiny_tokenizer()
    torch.manual_seed(0)
    model = sft.build_tiny_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2)
    _, completions = common.evaluate_accuracy(model, tokenizer, PROBLEMS, max_new_tokens=3)
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, completions)
    assert all(other == completions for other in gathered)
    print("completions:", json.dumps(completions))


if __name__ == "__main__":
    main()
    common.finish_distributed()
