"""``transformers serve`` on the embedded model, in a subprocess: it answers as the package's own generation does."""

from __future__ import annotations

import pytest

from qlora_guide import deployment
from qlora_guide.deployment.load_test import chat_request
from qlora_guide.deployment.transformers_serve import transformers_serve
from qlora_guide.errors import QLoRAGuideError


@pytest.mark.slow
def test_transformers_serve_gives_the_greedy_answer_of_the_same_model(embedded_model):
    lm = deployment.load_any(str(embedded_model), dtype="float32")
    question = "What is the capital of France?"
    ours = deployment.generate(lm, question, max_new_tokens=12, stream=False)
    with transformers_serve(embedded_model, dtype="float32") as url:
        assert url.startswith("http://127.0.0.1:")
        reply = chat_request(url, str(embedded_model), question, 12)
    assert reply["choices"][0]["message"]["content"] == ours
    assert reply["usage"]["completion_tokens"] <= 12


def test_a_folder_without_a_model_is_one_line(tmp_path):
    with pytest.raises(QLoRAGuideError, match="is not a model folder .* takes a merged model"):
        with transformers_serve(tmp_path):
            pass
