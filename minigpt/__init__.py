"""minigpt: the package behind the book that builds a small ChatGPT step by step."""

from minigpt.recipe import RECIPES, Recipe, recipe

__all__ = ["RECIPES", "Recipe", "recipe"]
__version__ = "0.1.0"
