"""Trainers (pretrain now; SFT, reward model and PPO next) and the helpers they share."""
