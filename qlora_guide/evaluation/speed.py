"""Speed: time to first token and tokens per second of generation, and seconds per training step of QLoRA and LoRA."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from qlora_guide.deployment.generation import FirstTokenClock, generate_ids
from qlora_guide.evaluation.likelihood import model_device

log = logging.getLogger(__name__)


SPEED_PROMPT = "Explain in a few sentences what QLoRA is and why it saves memory."


def measure_generation(model: Any, tokenizer: Any, prompt: str = SPEED_PROMPT, max_new_tokens: int = 64, repeats: int = 1) -> dict[str, float]:
    """Time to first token and generated tokens per second of one greedy answer of exactly ``max_new_tokens``.

    ``min_new_tokens`` forces the same number of tokens for every model, so
    their speeds compare. ``tokens_per_s`` counts all generated tokens over
    the whole call (prompt processing included); ``decode_tokens_per_s`` only
    the tokens after the first, over the time after it. A short generation
    runs first, untimed, so one-off costs (CUDA kernels, bitsandbytes' CPU
    weight repacking) are not charged to the first model measured. With
    ``repeats`` > 1 the fastest run is kept.
    """
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    ) if getattr(tokenizer, "chat_template", None) else prompt
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model_device(model))
    generate_ids(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=2, tokenizer=tokenizer)
    best: dict[str, float] | None = None
    for _ in range(max(1, repeats)):
        streamer = FirstTokenClock()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        new = generate_ids(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, tokenizer=tokenizer, streamer=streamer)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        end = time.perf_counter()
        n = new.shape[1]
        first = streamer.first or end
        run = {
            "ttft_s": round(first - start, 4),
            "tokens_per_s": round(n / (end - start), 2),
            "decode_tokens_per_s": round((n - 1) / (end - first), 2) if n > 1 and end > first else 0.0,
            "generated_tokens": int(n),
            "prompt_tokens": int(batch["input_ids"].shape[1]),
        }
        if best is None or run["tokens_per_s"] > best["tokens_per_s"]:
            best = run
    return best


def measure_training_steps(recipe: Any = "demo", tokens: tuple[int, ...] = (64, 1024), steps: int = 2) -> list[dict[str, Any]]:
    """Seconds per training step (forward, backward, AdamW) of the recipe's model with a 4-bit base (QLoRA) and
    with its 16-bit base (LoRA), on one sequence of each length in ``tokens`` of random ids.

    Each model is built as training builds it (:func:`qlora_guide.training.build_model`, on this machine's
    precision path); one untimed step first, then the median of ``steps``.
    """
    import statistics

    from qlora_guide.config import load_recipe
    from qlora_guide.memory import _random_batch
    from qlora_guide.training import build_model, free_memory, resolve_precision

    seconds: dict[tuple[str, int], float] = {}
    for method, override in (("QLoRA", []), ("LoRA", ["quantization=null"])):
        run = load_recipe(recipe, override)
        model = build_model(run, resolve_precision(run))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for length in tokens:
            batch = _random_batch(model.config.vocab_size, 1, length, str(model_device(model)))
            times = []
            for _ in range(steps + 1):
                start = time.perf_counter()
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
            seconds[method, length] = statistics.median(times[1:])
        del model, optimizer
        free_memory()
    return [{"tokens": length, "QLoRA s/step": seconds["QLoRA", length], "LoRA s/step": seconds["LoRA", length],
             "QLoRA / LoRA": seconds["QLoRA", length] / seconds["LoRA", length]} for length in tokens]
