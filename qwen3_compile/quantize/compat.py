"""Recipe/target compatibility, checked before any work: a recipe needs its precision on the target's
list and the target's SM at least the recipe's `min_sm` (FP8 needs SM 8.9: Jetson Orin, SM 8.7, has none).
"""

from __future__ import annotations

from qwen3_compile.errors import BadInputError
from qwen3_compile.quantize.recipe import QuantRecipe, builtin_recipes, load_recipe
from qwen3_compile.targets import Target


def sm_tuple(version: str) -> tuple[int, ...]:
    """'8.7' -> (8, 7), for comparing SM versions."""
    return tuple(int(part) for part in str(version).split("."))


def recipe_fits_target(recipe: QuantRecipe, target: Target) -> bool:
    return set(recipe.precisions) <= set(target.precisions) and sm_tuple(target.sm) >= sm_tuple(recipe.min_sm)


def fitting_recipes(target: Target) -> list[str]:
    """Built-in recipes the target can run, by name."""
    return [name for name in sorted(builtin_recipes()) if recipe_fits_target(load_recipe(name), target)]


def check_recipe_target(recipe: QuantRecipe, target: Target) -> None:
    """Raise a BadInputError naming the recipes that do fit when `recipe` cannot run on `target`."""
    if recipe_fits_target(recipe, target):
        return
    missing = [p for p in recipe.precisions if p not in target.precisions]
    why = (
        f"{' and '.join(missing)} is not among its precisions ({', '.join(target.precisions)})"
        if missing
        else f"it needs SM >= {recipe.min_sm}"
    )
    raise BadInputError(
        f"recipe '{recipe.name}' cannot run on {target.name} (SM {target.sm}): {why}.",
        file=recipe.source or None,
        field="--recipe",
        fix=f"recipes that fit {target.name}: {', '.join(fitting_recipes(target)) or 'none'}.",
    )
