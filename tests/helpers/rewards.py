"""A reward function on text for the commands' tests ('helpers.rewards:short' in train.reward)."""


def short(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for an answer of at most 3 characters, else 0."""
    return [float(len(r.strip()) <= 3) for r in responses]
