# Run by tests/test_distributed.py under torchrun (not collected by pytest):
#   torchrun --nproc_per_node N tests/distributed_grpo_update.py MODEL OUTPUT
# For each configuration below, two GRPO updates (grpo.policy_update) on fixed rollouts of 16 completions, each
# process given its share of the rows; rank 0 saves the final weights and metrics to OUTPUT. Any N must give
# the same result as N = 1.
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import grpo  # noqa: E402

CONFIGURATIONS = {
    "grpo_kl_mu2": dict(loss_type="grpo", beta=0.1, num_iterations=2),
    "dapo_batch_scaling": dict(loss_type="dapo", beta=0.0, num_iterations=1, scale_rewards="batch"),
    "dr_grpo_mu2_clip_higher": dict(loss_type="dr_grpo", beta=0.0, num_iterations=2, epsilon_high=0.28),
}
BATCH_SIZE, GROUP_SIZE, PROMPT_LENGTH, COMPLETION_LENGTH = 16, 4, 3, 4


def fixed_rollout(generator: torch.Generator, vocab_size: int) -> tuple[dict, torch.Tensor]:
    """A made-up rollout: random tokens, some left padding, completions of 1-4 tokens, 0/1 rewards (one group all 1)."""
    length = PROMPT_LENGTH + COMPLETION_LENGTH
    input_ids = torch.randint(3, vocab_size, (BATCH_SIZE, length), generator=generator)
    prompt_mask = torch.ones(BATCH_SIZE, PROMPT_LENGTH, dtype=torch.long)
    prompt_mask[::3, 0] = 0  # left padding
    completion_lengths = torch.randint(1, COMPLETION_LENGTH + 1, (BATCH_SIZE, 1), generator=generator)
    mask = (torch.arange(COMPLETION_LENGTH) < completion_lengths).long()
    rewards = torch.randint(0, 2, (BATCH_SIZE,), generator=generator).float()
    rewards[:GROUP_SIZE] = 1.0  # a group that scored the same: advantage 0
    rollout = {"input_ids": input_ids, "attention_mask": torch.cat([prompt_mask, mask], dim=1), "mask": mask}
    return rollout, rewards


def main() -> None:
    model_path, output = sys.argv[1], sys.argv[2]
    rank, world_size, device = common.setup_distributed("cpu")
    results = {}
    for name, overrides in CONFIGURATIONS.items():
        args = grpo.Args(
            model=model_path,
            batch_size=BATCH_SIZE,
            group_size=GROUP_SIZE,
            micro_batch_size=2,
            max_completion_length=COMPLETION_LENGTH,
            learning_rate=0.5,
            **overrides,
        )
        args.epsilon_high = args.epsilon_high or args.epsilon
        model = common.load_model(model_path)
        reference = common.load_model(model_path).requires_grad_(False) if args.beta else None
        # plain SGD: the weights then show the gradients directly (Adam would blow the rounding noise of gradients that
        # are 0 in exact arithmetic, such as the attention key bias's, up to steps of size lr)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: 1.0)
        generator = torch.Generator().manual_seed(0)
        for _ in range(2):
            rollout, rewards = fixed_rollout(generator, model.config.vocab_size)
            rollout["advantages"] = grpo.group_advantages(rewards, GROUP_SIZE, args.scale_rewards)
            mine = {key: common.shard(value, rank, world_size) for key, value in rollout.items()}
            metrics = grpo.policy_update(
                model, optimizer, scheduler, reference, {**mine, "prompt_length": PROMPT_LENGTH}, args
            )
        results[name] = {"state": model.state_dict(), "metrics": metrics}
    if rank == 0:
        torch.save(results, output)


if __name__ == "__main__":
    main()
    common.finish_distributed()
