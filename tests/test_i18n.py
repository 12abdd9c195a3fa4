"""qlora_guide.i18n: numbers in the reader's conventions, strict catalogues, outputs in every language at once."""

import html
import re

import pandas as pd
import pytest

from qlora_guide.i18n import MissingTranslation, format_number, localise_numbers, translate
from qlora_guide.i18n import catalogue as catalogue_module
from qlora_guide.i18n.outputs import localise_table, say, select, show

NNBSP = "\u202f"


@pytest.fixture
def catalogues(tmp_path, monkeypatch):
    """A project catalogue folder for French, named the way the guide names its own."""
    folder = tmp_path / "fr" / "outputs"
    folder.mkdir(parents=True)
    monkeypatch.setenv("QLORA_GUIDE_CATALOGUES", str(tmp_path / "{lang}" / "outputs"))
    catalogue_module._load.cache_clear()
    yield folder
    catalogue_module._load.cache_clear()


# -- numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(("value", "spec", "english", "french"), [
    (4.127473, ".3f", "4.127", "4,127"),
    (0.742033, ".1%", "74.2%", f"74,2{NNBSP}%"),
    (65536, "", "65536", f"65{NNBSP}536"),  # French groups five digits and more
    (1536, "", "1536", "1536"),
    (1234567.25, ",.2f", "1,234,567.25", f"1{NNBSP}234{NNBSP}567,25"),
    (-0.25, ".2f", "-0.25", "\u22120,25"),
    (1.5e-5, ".1e", "1.5e-05", "1,5e\u221205"),
    (3, "d", "3", "3"),
])
def test_format_number_writes_each_language_s_conventions(value, spec, english, french):
    assert format_number(value, spec, "en") == english
    assert format_number(value, spec, "fr") == french


def test_localise_numbers_leaves_versions_names_and_code_alone():
    text = "torch 2.13.0, SmolLM2-135M, Q8_0, layer 10, 4.127 bits, 16 x 512, model.layers.0"
    assert localise_numbers(text, "fr") == "torch 2.13.0, SmolLM2-135M, Q8_0, layer 10, 4,127 bits, 16 x 512, model.layers.0"
    assert localise_numbers(text, "en") == text


def test_format_number_refuses_what_is_not_a_number():
    with pytest.raises(TypeError, match="not str"):
        format_number("4.1", ".1f", "fr")
    with pytest.raises(ValueError, match="no number conventions for language 'de'"):
        localise_numbers("4.1", "de")


# -- catalogues ---------------------------------------------------------------


def test_translate_is_strict_and_names_the_missing_text(catalogues):
    assert translate("training loss", "fr") == "perte d\u2019entraînement"  # the package's, typeset as the prose
    assert translate("no such label", "en") == "no such label"  # English reads no catalogue
    with pytest.raises(MissingTranslation, match="no fr text for 'no such label': add it to one of .*fr.yaml"):
        translate("no such label", "fr")
    assert translate("q_proj", "fr", strict=False) == "q_proj"


def test_project_catalogues_add_to_the_package_s_and_may_not_contradict_it(catalogues):
    (catalogues / "page.yaml").write_text("the answer: la réponse\n", encoding="utf-8")
    assert translate("the answer", "fr") == "la réponse"
    (catalogues / "other.yaml").write_text("training loss: perte\n", encoding="utf-8")
    catalogue_module._load.cache_clear()
    with pytest.raises(catalogue_module.QLoRAGuideError, match="'training loss' is translated twice"):
        translate("the answer", "fr")


def test_an_unknown_language_is_refused(catalogues):
    with pytest.raises(catalogue_module.QLoRAGuideError, match="language must be one of en, fr, not 'de'"):
        translate("training loss", "de")


# -- outputs --------------------------------------------------------------------


def _text(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def test_say_translates_the_template_and_localises_only_its_numbers(catalogues):
    (catalogues / "page.yaml").write_text(
        '"{dtype}: {size:.2f} GiB, {share:.1%} of the total": "{dtype}\\u00a0: {size:.2f}\\u202fGio, {share:.1%} du total"\n',
        encoding="utf-8")
    out = say("{dtype}: {size:.2f} GiB, {share:.1%} of the total", dtype="torch.float32", size=1234.5, share=0.25)
    assert repr(out) == "torch.float32: 1234.50 GiB, 25.0% of the total"
    assert _text(select(out._repr_html_(), "en")) == "torch.float32: 1234.50 GiB, 25.0% of the total"
    assert _text(select(out._repr_html_(), "fr")) == f"torch.float32\u00a0: 1234,50{NNBSP}Gio, 25,0{NNBSP}% du total"


def test_booleans_read_yes_or_no_in_each_language(catalogues):
    (catalogues / "page.yaml").write_text('"fits in 48 GiB: {fits}": "tient dans 48\\u202fGio\\u00a0: {fits}"\n',
                                          encoding="utf-8")
    out = say("fits in 48 GiB: {fits}", fits=True)
    assert _text(select(out._repr_html_(), "en")) == "fits in 48 GiB: yes"
    assert _text(select(out._repr_html_(), "fr")) == f"tient dans 48{NNBSP}Gio\u00a0: oui"
    (catalogues / "table.yaml").write_text("fits: tient\n", encoding="utf-8")
    catalogue_module._load.cache_clear()
    assert list(localise_table(pd.DataFrame({"fits": [True, False]}), "fr")["tient"]) == ["oui", "non"]


def test_select_keeps_one_language_and_ignores_other_html():
    markup = "<!--qg:en--><b>one</b><!--/qg:en--><!--qg:fr--><b>un</b><!--/qg:fr-->"
    assert select(markup, "en") == "<b>one</b>"
    assert select(markup, "fr") == "<b>un</b>"
    assert select("<table>...</table>", "fr") is None


def test_a_table_s_labels_are_translated_and_its_numbers_keep_pandas_precision(catalogues):
    (catalogues / "page.yaml").write_text("variant: variante\nbf16 base: base bf16\nperplexity: perplexité\n",
                                          encoding="utf-8")
    table = pd.DataFrame({"perplexity": [12.5, 3.14159], "dtype": ["bfloat16", "nf4"]},
                         index=pd.Index(["bf16 base", "fine-tuned"], name="variant"))
    with pytest.raises(MissingTranslation, match="'dtype'"):
        localise_table(table, "fr")
    (catalogues / "more.yaml").write_text("dtype: dtype\n", encoding="utf-8")
    catalogue_module._load.cache_clear()
    french = localise_table(table, "fr")
    assert list(french.columns) == ["perplexité", "dtype"]
    assert list(french.index) == ["base bf16", "affiné"] and french.index.name == "variante"
    # pandas shows the column with one precision (12.50000, 3.14159): French keeps it, with commas
    english = table["perplexity"].to_string(index=False, header=False).split()
    assert list(french["perplexité"]) == [e.replace(".", ",") for e in english]
    assert list(french["dtype"]) == ["bfloat16", "nf4"]  # data that is no label stays as it is
    assert localise_table(table, "en") is table
    settings = pd.Series({"lora_dropout": 0.05, "use_dora": False, "target_modules": "all-linear"}, name="value")
    (catalogues / "settings.yaml").write_text("value: valeur\nlora_dropout: lora_dropout\nuse_dora: use_dora\n"
                                             "target_modules: target_modules\n", encoding="utf-8")
    catalogue_module._load.cache_clear()
    assert list(localise_table(settings, "fr")) == ["0,05", "non", "all-linear"]  # a column of mixed values


def test_show_calls_a_function_once_per_language_and_draws_french_figures():
    from qlora_guide import plots

    calls = []

    def loss_curves(history, lang):
        calls.append(lang)
        return plots.plot_loss_curves(history, lang=lang)

    out = show(loss_curves, [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}])
    assert calls == ["en", "fr"]
    english, french = select(out._repr_html_(), "en"), select(out._repr_html_(), "fr")
    assert 'alt="Training and validation loss"' in english and 'lang="en"' in english
    assert 'alt="Perte d\u2019entraînement et de validation"' in french and 'lang="fr"' in french
    assert english.count("data:image/png;base64,") == french.count("data:image/png;base64,") == 1


def test_show_refuses_a_function_that_cannot_write_french():
    with pytest.raises(TypeError, match="takes no 'lang'"):
        show(lambda history: None, [])
