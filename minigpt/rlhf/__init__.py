"""RLHF from scratch: a reward model, PPO, DPO and GRPO/RLOO on top of an SFT model.

* :mod:`~minigpt.rlhf.core` -- sampling responses, packing them, per-token log-probs, KL;
* :mod:`~minigpt.rlhf.reward` -- preference pairs and the Bradley-Terry reward model;
* :mod:`~minigpt.rlhf.ppo` -- PPO with a KL penalty, GAE and a critic;
* :mod:`~minigpt.rlhf.dpo` -- DPO (and RPO's NLL term) on pairs, no reward model;
* :mod:`~minigpt.rlhf.grpo` -- GRPO and RLOO with a verifiable reward, no critic;
* :mod:`~minigpt.rlhf.run` -- the per-profile settings and the runs behind ``minigpt rlhf``.
"""
