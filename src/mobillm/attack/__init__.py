"""The server as an attacker: how much of the device's text and labels a session gives away.

``run_attack`` measures token recovery from all-token frames, bag-of-words recovery from loss
rows, and label recovery from a private-label session's gradients (``mobillm attack``).
"""

from mobillm.attack.config import AttackConfig
from mobillm.attack.run import run_attack

__all__ = ["AttackConfig", "run_attack"]
