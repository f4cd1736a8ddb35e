"""minigpt: the package behind the book that builds a small ChatGPT step by step."""

from minigpt.profiles import PROFILES, Profile, profile

__all__ = ["PROFILES", "Profile", "profile"]
__version__ = "0.1.0"
