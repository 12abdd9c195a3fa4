"""The loss on answer tokens during training: the output layer on labelled positions only, and validation."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from qlora_guide.loss import IGNORE_INDEX, answer_token_count, answer_token_nll

log = logging.getLogger(__name__)


def validation_loss(model: Any, batches: Any, autocast: Any = contextlib.nullcontext,
                    gather: Callable[[Any], Any] | None = None) -> tuple[float, int]:
    """Token-weighted loss over batches: (mean loss per answer token, number of answer tokens).

    transformers' own evaluation averages per-batch means, which weights a short
    batch like a long one; this sums over tokens (:func:`~qlora_guide.loss.answer_token_nll`,
    as evaluation's perplexity does), so packed and unpacked data give the same figure.

    On several processes ``gather`` is accelerate's ``gather_for_metrics``: every process
    gets every sequence's sums, except the sequences accelerate repeats so that each process
    has as many batches as the others, which would otherwise count twice.
    """
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            labels = batch["labels"]
            if gather is None and answer_token_count(labels) == 0:
                continue
            with autocast():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                sums = torch.stack([answer_token_nll(logits[i:i + 1], labels[i:i + 1]) for i in range(len(labels))])
            counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
            if gather is not None:
                sums, counts = gather((sums.double(), counts))
            total += float(sums.double().sum())
            count += int(counts.sum())
    model.train(was_training)
    return (total / count if count else float("nan")), count


class AnswerOnlyLogits:
    """Compute the output layer only at the positions that have a label.

    With the loss on answers only, the logits of the prompt tokens are thrown
    away: the model is asked for the last position's logits only
    (``logits_to_keep=1``), the final hidden states are caught on their way out
    of the decoder, and the output layer runs on the labelled positions alone.
    On the demo recipe, where about half the tokens are prompt, that halves the
    work of the output layer. The first batch is checked against the model's
    own loss; a model that transforms its logits (soft-capping, scaling) fails
    the check and keeps the ordinary path.
    """
    def __init__(self, model: Any) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder, self.head = base.get_decoder(), base.get_output_embeddings()
        self.checked: bool | None = None  # None: not checked yet

    def loss(self, model: Any, inputs: dict[str, Any], labels: Any, num_items: Any = None) -> Any:
        caught: list[Any] = []
        handle = self.decoder.register_forward_hook(lambda _m, _a, out: caught.append(out.last_hidden_state))
        try:
            model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        total = answer_token_nll(caught[-1], labels, head=self.head)  # the output layer on labelled positions only
        return total / (num_items if num_items is not None else max(answer_token_count(labels), 1))

    def check(self, model: Any, inputs: dict[str, Any], labels: Any, autocast: Any,
              compute_dtype: Any = None) -> bool:
        """Compare with the model's own loss once (eval mode: no dropout); keep the result.

        A model whose config transforms its logits (``final_logit_softcapping``,
        ``logit_scale``) keeps the ordinary path without trying. Otherwise the
        two losses, rounded to ``compute_dtype`` (the autocast dtype of the
        model's forward, where the model's own logits are computed), must agree
        within torch's default tolerance for that dtype: with bf16 logits the two
        paths round differently (the output layer runs on fewer rows), which a
        float32 tolerance would mistake for a transformed loss.
        """
        if self.checked is not None:
            return self.checked
        config = getattr(model, "config", None)
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", 1.0) not in (None, 1.0):
            log.info("the model transforms its logits (soft-capping or scaling): computing all logits")
            self.checked = False
            return False
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast():
                ours = self.loss(model, inputs, labels)
                output = model(**inputs, labels=labels)
            dtype = compute_dtype or output.logits.dtype
            torch.testing.assert_close(ours.to(dtype), output.loss.to(dtype))  # the tolerances of dtype
            self.checked = True
        except AssertionError:
            log.info("the model's loss is not the plain cross-entropy of its output layer: computing all logits")
            self.checked = False
        except (AttributeError, TypeError) as err:  # no get_decoder, no logits_to_keep...
            log.info("answer-only logits unavailable (%s): computing all logits", err)
            self.checked = False
        finally:
            model.train(was_training)
        return self.checked
