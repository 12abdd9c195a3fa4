"""Sphinx configuration of the bilingual, executable QLoRA guide.

English is the source language; French comes from the gettext catalogues in
``locales/fr/LC_MESSAGES`` and is built with ``-D language=fr``. Pages are MyST
text notebooks executed by myst-nb at build time. Build both languages with
``python docs/tools/build_site.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS_DIR = Path(__file__).resolve().parent
REPO_ROOT = DOCS_DIR.parent
PACKAGE_DIR = REPO_ROOT / "qlora_guide"

# Executed cells must never reach the Hugging Face hub; the kernels started by
# myst-nb inherit this environment.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(DOCS_DIR / "_ext"))

from package_hash import execution_cache_name  # noqa: E402

# -- Project -------------------------------------------------------------------

project = "QLoRA guide"
author = "The qlora-guide authors"
copyright = "The qlora-guide authors"
language = "en"  # overridden with -D language=fr for the French build

extensions = [
    "myst_nb",
    "sphinx_design",
    "sphinx_copybutton",
    "glue_i18n",
    "language_outputs",
    "translated_headings",
    "original_code",
    "colour_roles",
    "language_switch",
    "notebook_download",
    "execution_times",
    "parallel_execution",
]

exclude_patterns = ["_build", "_build.*", "jupyter_execute", "locales", "tools", "**.ipynb_checkpoints", "README.md"]
templates_path = ["_templates"]

# -- Translation ---------------------------------------------------------------

locale_dirs = ["locales/"]
gettext_compact = False  # one catalogue per page
gettext_additional_targets: list[str] = []  # code cells and outputs stay as they are
gettext_uuid = False
gettext_location = True

# -- MyST and myst-nb ------------------------------------------------------------

myst_enable_extensions = [
    "colon_fence",
    "deflist",
    "dollarmath",
    "amsmath",
    "attrs_inline",
    "attrs_block",
    "substitution",
]

# The cells write their outputs in every language at once (qlora_guide.i18n); the
# sentences the pages print find their translations here.
OUTPUT_CATALOGUES = DOCS_DIR / "locales" / "{lang}" / "outputs"
os.environ["QLORA_GUIDE_CATALOGUES"] = str(OUTPUT_CATALOGUES)

nb_execution_mode = "cache"
nb_execution_cache_path = str(DOCS_DIR / "_build" / ".jupyter_cache" / execution_cache_name(DOCS_DIR))
# Training runs that several pages share (the demo run) live in the same folder,
# so a change in the package trains them again and old ones are pruned with it.
os.environ["QLORA_GUIDE_DOCS_RUNS"] = str(Path(nb_execution_cache_path) / "runs")
nb_execution_raise_on_error = True
nb_execution_show_tb = True  # a failing cell prints its traceback in the build log
nb_execution_timeout = 600
nb_execution_in_temp = True  # cells never write into the source tree
nb_merge_streams = True

# -- HTML ----------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "QLoRA guide"
html_static_path = ["_static"]
html_css_files = ["colours.css"]
html_copy_source = True
html_sourcelink_suffix = ""  # the download button then offers the .md itself
html_context = {"default_mode": "auto"}  # light or dark, as the reader's system says
html_theme_options = {
    "use_download_button": True,
    "use_fullscreen_button": True,
    "home_page_in_toc": True,
    "show_toc_level": 2,
    "article_header_end": ["lang-switch.html", "article-header-buttons.html"],
    # pydata-sphinx-theme 0.20 adds a top bar with a search field unless this is
    # set; the book theme already has search in its sidebar.
    "navbar_persistent": [],
    "footer_content_items": ["copyright.html", "last-updated.html", "extra-footer.html"],
}

# -- Copy buttons ----------------------------------------------------------------

copybutton_prompt_text = r">>> |\.\.\. |\$ |In \[\d*\]: | {2,5}\.\.\.: | {5,8}: "
copybutton_prompt_is_regexp = True
copybutton_exclude = ".linenos, .gp, .go"
# Code cells and literal blocks get a button; executed outputs do not.
copybutton_selector = "div:not(.output) > div.highlight pre"


def _localise_titles(app, config) -> None:
    """Give the French build a French site title."""
    if config.language == "fr":
        config.html_title = "Guide QLoRA"


def setup(app):
    """Hook the per-language settings that depend on ``-D language=...``."""
    app.connect("config-inited", _localise_titles)
