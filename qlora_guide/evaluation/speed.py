"""Generation speed: time to first token and tokens per second, with the peak memory of the call."""

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
