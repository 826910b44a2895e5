"""Reward functions for the RL tests (align.reward=tests.train.toy_rewards:NAME)."""

import math

CALLS = {"n": 0}


def vowels(prompts, completions, **fields):
    """The share of vowels in the completion: dense, so every group differs."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def flaky(prompts, completions, **fields):
    """Raises on its 2nd call and returns NaN on its 3rd; otherwise `vowels`."""
    CALLS["n"] += 1
    if CALLS["n"] == 2:
        raise RuntimeError("the grader is down")
    if CALLS["n"] == 3:
        return [math.nan] * len(completions)
    return vowels(prompts, completions)


def broken(prompts, completions, **fields):
    raise KeyError("no such field")


def wrong_length(prompts, completions, **fields):
    return [0.0]
