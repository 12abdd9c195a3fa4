"""The bundled recipes (the YAML files of this folder), and ``qlora-guide recipes``: list, show or copy one."""

from __future__ import annotations

from typing import Any

from qlora_guide.config import bundled_recipes, copy_recipe, load_recipe, recipe_path


def recipes(show: str | None = None, copy: tuple[str, str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """The bundled recipes with their model and description; or one recipe's text (``show``);
    or copy the recipe ``copy[0]`` to ``copy[1]`` (a folder or a ``.yaml`` name), never over a file unless ``overwrite``."""
    if show:
        path = recipe_path(show)
        return {"name": show, "path": str(path), "text": path.read_text(encoding="utf-8")}
    if copy:
        name, dest = copy
        return {"name": name, "copied_to": [str(p) for p in copy_recipe(name, dest, overwrite=overwrite)]}
    rows = []
    for name, path in bundled_recipes().items():
        recipe = load_recipe(path)
        rows.append({"name": name, "model": recipe.model.name_or_path, "description": recipe.description,
                     "path": str(path)})
    return {"recipes": rows}


def format_recipes(result: dict[str, Any]) -> str:
    """What ``recipes`` returned, as a person reads it."""
    if "text" in result:
        return result["text"].rstrip("\n")
    if "copied_to" in result:
        return f"copied recipe '{result['name']}' to " + ", ".join(result["copied_to"])
    rows = result["recipes"]
    width = max(len(r["name"]) for r in rows)
    lines = [f"{r['name']:<{width}}  {r['description']}" for r in rows]
    lines.append("\nShow one: qlora-guide recipes --show NAME    Copy one to edit: qlora-guide recipes --copy NAME DEST.yaml")
    return "\n".join(lines)
