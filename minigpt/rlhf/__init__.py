"""RLHF from scratch: a reward model, PPO, DPO and GRPO/RLOO on top of an SFT model.

* :mod:`~minigpt.rlhf.core` -- sampling responses, packing them, per-token log-probs, KL;
* :mod:`~minigpt.rlhf.reward` -- preference pairs and the Bradley-Terry reward model;
* :mod:`~minigpt.rlhf.ppo` -- PPO with a KL penalty, GAE and a critic;
* :mod:`~minigpt.rlhf.dpo` -- DPO (and RPO's NLL term) on pairs, no reward model;
* :mod:`~minigpt.rlhf.grpo` -- GRPO and RLOO with a verifiable reward, no critic;
* :mod:`~minigpt.rlhf.run` -- the per-profile settings and the runs behind ``minigpt rlhf``.

The package re-exports each method's loss and config (the training loops stay in their modules,
whose names they share): ``from minigpt.rlhf import ppo_losses, grpo_loss, dpo_loss``.
"""

from minigpt.rlhf.dpo import DPOConfig, dpo_loss
from minigpt.rlhf.grpo import GRPOConfig, group_advantages, grpo_loss, k3_kl
from minigpt.rlhf.ppo import PPOConfig, gae, ppo_losses
from minigpt.rlhf.reward import bradley_terry_loss

__all__ = [
    "DPOConfig",
    "GRPOConfig",
    "PPOConfig",
    "bradley_terry_loss",
    "dpo_loss",
    "gae",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "ppo_losses",
]
