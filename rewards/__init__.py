"""Reward models: one interface, a registry, and built-in programmatic rewards that need no weights.

A reward takes a batch of images (uint8, N x H x W x 3), their prompts and per-prompt metadata, and
returns a dict of named per-image float arrays; its first output is the one training uses.
"""
from .base import Reward, RewardError
from .registry import load_reward_class, make_reward

__all__ = ["Reward", "RewardError", "load_reward_class", "make_reward"]
