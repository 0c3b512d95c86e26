"""Notebook presets: one parameter (``preset = "demo"``) that turns a notebook's GPU defaults into the offline demo.

Each notebook's parameters cell holds the real user's values (a hub model on an Intel GPU). With ``preset = "demo"``
the parameters still at those defaults take the values of ``recipes/cpu_demo.yaml`` (the tiny demo model, built
offline if missing; the shipped sample; CPU settings) plus :data:`DEMO_EXTRAS`; a parameter the user changed keeps
its value. Papermill sets notebook variables, not a recipe, hence this small helper of our own.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from dpo_xpu.errors import RecipeError

#: What the demo preset sets beyond recipes/cpu_demo.yaml: a held-out split and short samples for notebook 4.
DEMO_EXTRAS: dict[str, Any] = {"eval_fraction": 0.1, "num_samples": 3, "max_new_tokens": 48}
#: Recipe values that are paths relative to the project root.
DEMO_PATHS = ("model_name_or_path", "dataset_name_or_path", "output_dir")
PRESETS = (None, "demo")
#: What each preset but ``None`` is, for the message that refuses an unknown one.
PRESET_HELP = {"demo": "the tiny offline demo on the CPU, recipes/cpu_demo.yaml"}


def apply_preset(
    preset: str | None,
    defaults: dict[str, Any],
    namespace: dict[str, Any],
    recipe_path: str | Path = "../recipes/cpu_demo.yaml",
) -> dict[str, Any]:
    """Apply ``preset`` to a notebook's variables.

    Args:
        preset: ``None`` (change nothing) or ``"demo"``.
        defaults: the parameters cell's declared defaults, ``{name: value}``.
        namespace: the notebook's variables (``globals()`` in the notebook); changed in place.
        recipe_path: the demo recipe, relative to the notebook's folder (``notebooks/``) by default.

    Returns:
        ``{name: new value}`` of the variables it changed (printed in one line).

    Raises:
        RecipeError: an unknown ``preset`` (one line in the notebook: the valid presets, and the closest one).
    """
    if preset is None:
        return {}
    if preset not in PRESETS:
        names = [name for name in PRESETS if name is not None]
        close = difflib.get_close_matches(str(preset).strip().lower(), names, n=1)
        hint = f'did you mean "{close[0]}"? ' if close else ""
        raise RecipeError(
            f"preset = {preset!r} is not a preset: {hint}use None (the defaults above, for an Intel GPU) or "
            + " or ".join(f'"{name}" ({PRESET_HELP[name]})' for name in names)
        )
    import dpo_xpu
    from dpo_xpu.recipes import load_recipe

    recipe_path = Path(recipe_path)
    demo = {**load_recipe(recipe_path).to_dict(), **DEMO_EXTRAS}
    for key in DEMO_PATHS:
        demo[key] = str((recipe_path.parent.parent / demo[key]).resolve())  # the recipe's paths start at the root
    changed: dict[str, Any] = {}
    for name, default in defaults.items():
        if name in demo and namespace[name] == default != demo[name]:  # still at its default, the demo's differs
            changed[name] = namespace[name] = demo[name]
    if "model_name_or_path" in changed:
        dpo_xpu.build_demo_model(namespace["model_name_or_path"])  # offline, in seconds; reused once built
    print("preset demo:", ", ".join(f"{name}={value!r}" for name, value in changed.items()))
    return changed
