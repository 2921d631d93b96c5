"""Training stages, each resumable from its own checkpoints: pretrain → sft → reward (→ ppo)."""

from chatrl.services.trainer.stages import pretrain, reward_model, sft

STAGES = {"pretrain": pretrain.run, "sft": sft.run, "reward": reward_model.run}
