"""Attacks on a model's refusals. Each module exposes a config dataclass and ``run``."""
