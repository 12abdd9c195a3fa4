"""The execution cache of the docs is named after every file the package ships (docs/_ext/package_hash.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "docs" / "_ext"))

from package_hash import package_source_hash  # noqa: E402


def test_the_hash_follows_code_recipes_and_bundled_json_but_not_bytecode(tmp_path):
    package = tmp_path / "pkg"
    (package / "assets" / "model_configs").mkdir(parents=True)
    (package / "__pycache__").mkdir()
    (package / "a.py").write_text("x = 1\n")
    config = package / "assets" / "model_configs" / "m.json"
    config.write_text('{"hidden_size": 4096}')
    first = package_source_hash(package)
    (package / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert package_source_hash(package) == first, "bytecode must not start a fresh cache"
    config.write_text('{"hidden_size": 5120}')
    assert package_source_hash(package) != first, "a bundled config feeds the pages' figures"


def test_the_hash_follows_the_catalogues_the_cells_read(tmp_path):
    package, outputs = tmp_path / "pkg", tmp_path / "outputs"
    package.mkdir()
    outputs.mkdir()
    (package / "a.py").write_text("x = 1\n")
    catalogue = outputs / "page.yaml"
    catalogue.write_text("training loss: perte\n")
    first = package_source_hash(package, outputs)
    assert package_source_hash(package) != first
    catalogue.write_text("training loss: perte d'entraînement\n")
    assert package_source_hash(package, outputs) != first, "a new translation must execute the pages again"


def test_the_build_keeps_the_cache_the_pages_execute_into():
    """build_site prunes every execution cache but the current one: it must name it as conf.py does, or each
    build would delete the cache and execute every page again."""
    docs = Path(__file__).parents[1] / "docs"
    sys.path.insert(0, str(docs / "tools"))
    try:
        import build_site
    finally:
        sys.path.remove(str(docs / "tools"))
    from package_hash import execution_cache_name

    conf = (docs / "conf.py").read_text()
    assert "execution_cache_name(DOCS_DIR)" in conf
    assert build_site.current_cache_name() == execution_cache_name(docs)
    assert execution_cache_name(docs) != package_source_hash(docs.parent / "qlora_guide")  # the catalogues count
