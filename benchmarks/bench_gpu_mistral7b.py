"""QLoRA vs 16-bit LoRA training steps at the `mistral-7b` recipe's shapes, on a CUDA GPU.

Random weights with Mistral-7B's architecture (no download), the guide's LoRA
settings (r=64 on the seven projections), gradient checkpointing, batch 4 x
512 tokens. Prints tokens/s and peak allocated memory of both side by side.

    python benchmarks/bench_gpu_mistral7b.py [--steps 6] [--folder /tmp/mistral-7b-random]
"""

import argparse
import gc
import time
from pathlib import Path

import torch

from qlora_guide.config import QuantizationConfig
from qlora_guide.memory import _peft_model, _random_batch, build_random_model, estimate, gib
from qlora_guide.models import load_model


def run(folder: Path, quantized: bool, batch_size: int, seq_len: int, steps: int) -> dict:
    """Train ``steps`` steps; time all but the first (warm-up)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    quantization = QuantizationConfig() if quantized else None
    model = _peft_model(load_model(str(folder), quantization=quantization, device_map="cuda:0"), 64, True)
    batch = _random_batch(model.config.vocab_size, batch_size, seq_len, "cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = sorted(times[1:])[len(times[1:]) // 2]
    result = {"tokens_per_s": batch_size * seq_len / step, "step_s": step, "peak": torch.cuda.max_memory_allocated()}
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--folder", default="/tmp/mistral-7b-random")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        build_random_model("mistral-7b", folder)
    print(f"{torch.cuda.get_device_name(0)}  Mistral-7B architecture, random weights, batch {args.batch_size} x {args.seq_len}, r=64, gradient checkpointing")
    print(f"{'':<22}{'tokens/s':>10}{'step (s)':>10}{'peak alloc':>12}{'planned':>10}")
    for method, quantized in (("QLoRA (NF4 + DQ)", True), ("LoRA (bf16 base)", False)):
        r = run(folder, quantized, args.batch_size, args.seq_len, args.steps)
        plan = estimate("mistral-7b", method="qlora" if quantized else "lora", batch_size=args.batch_size, seq_len=args.seq_len)
        print(f"{method:<22}{r['tokens_per_s']:>10.0f}{r['step_s']:>10.3f}{gib(r['peak']):>12}{gib(plan.tensor_peak):>10}", flush=True)


if __name__ == "__main__":
    main()
