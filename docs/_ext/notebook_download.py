"""Offer each executed page as a Jupyter notebook (.ipynb) in the download menu.

sphinx-book-theme adds the ".ipynb" entry only when a launch service (Binder,
Colab...) is configured. This copies the notebook that myst-nb executed into
the page's ``_sources`` folder and tells the theme about it, for every page
that has code cells.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def executed_notebook(app, pagename: str) -> Path | None:
    """The notebook myst-nb wrote for ``pagename``, if the page has code cells."""
    path = Path(app.env.mystnb_config.output_folder) / f"{pagename}.ipynb"
    if not path.exists():
        return None
    cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    return path if any(cell.get("cell_type") == "code" for cell in cells) else None


def add_notebook_download(app, pagename, templatename, context, doctree) -> None:
    """Copy the executed notebook next to the page's source and set ``ipynb_source``."""
    if doctree is None or not hasattr(app.env, "mystnb_config"):
        return
    notebook = executed_notebook(app, pagename)
    if notebook is None:
        return
    target = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(notebook, target)
    context["ipynb_source"] = f"{pagename}.ipynb"


def setup(app):
    """Run before the theme builds its header buttons (priority 501)."""
    app.connect("html-page-context", add_notebook_download, priority=450)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
