"""NF4 quantize / dequantize speed: the readable reference next to torchao and bitsandbytes.

    python benchmarks/bench_quantization.py                 # 4096 x 4096 bf16 on the CPU
    python benchmarks/bench_quantization.py --size 2048 --repeats 7 --out bench.json

All three run in one process on the same matrix, each timed as the median of
``--repeats`` runs after one warm-up, so their ratios are comparable even on a
busy machine. The three are:

* the reference (``qlora_guide.quantization``): plain torch, bit-exact with bitsandbytes;
* torchao's ``to_nf4`` (pure torch as well); optional: ``pip install torchao``;
* bitsandbytes' CPU backend: quantization is its own pure-torch kernel,
  dequantization its native C++ kernel.

All use blocksize 64 and double quantization of the absmax (blocks of 256).
The targets: the reference quantizes at least as fast as torchao, and
dequantizes within 10x of bitsandbytes' native kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first-call allocations, lazy imports, kernel caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def contenders(weight: Any) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (quantize, dequantize) closures on the same matrix."""
    import bitsandbytes.functional as bnbf

    from qlora_guide import quantization as Q

    ours = Q.quantize_4bit(weight, "nf4", 64, double_quant=True)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    found = {
        "reference (qlora_guide)": (
            lambda: Q.quantize_4bit(weight, "nf4", 64, double_quant=True),
            lambda: Q.dequantize_4bit(ours),
        ),
        "bitsandbytes (CPU backend)": (
            lambda: bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True),
            lambda: bnbf.dequantize_4bit(packed, state),
        ),
    }
    try:
        from torchao.quantization import to_nf4
    except ImportError:
        print("torchao is not installed (pip install torchao): its column is left out")
    else:
        nf4 = to_nf4(weight, block_size=64, scaler_block_size=256)
        found["torchao to_nf4"] = (lambda: to_nf4(weight, block_size=64, scaler_block_size=256), lambda: nf4.get_original_weight())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the matrix is size x size (default 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    weight = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    results = {}
    for name, (quantize, dequantize) in contenders(weight).items():
        results[name] = {"quantize_s": median_seconds(quantize, args.repeats), "dequantize_s": median_seconds(dequantize, args.repeats)}

    import bitsandbytes

    print(f"NF4 + double quant, blocksize 64, {args.size} x {args.size} bf16 on the CPU, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} (torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__})")
    print(f"{'':28s} {'quantize':>10s} {'dequantize':>11s}")
    for name, r in results.items():
        print(f"{name:28s} {r['quantize_s']:9.3f}s {r['dequantize_s']:10.4f}s")
    ref, bnb = results["reference (qlora_guide)"], results["bitsandbytes (CPU backend)"]
    summary = {"dequantize_vs_bitsandbytes": ref["dequantize_s"] / bnb["dequantize_s"]}
    print(f"reference dequantize / bitsandbytes: {summary['dequantize_vs_bitsandbytes']:.1f}x (target: within 10x)")
    if "torchao to_nf4" in results:
        summary["quantize_speedup_vs_torchao"] = results["torchao to_nf4"]["quantize_s"] / ref["quantize_s"]
        print(f"reference quantize speed-up over torchao to_nf4: {summary['quantize_speedup_vs_torchao']:.2f}x (target: at least 1x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"size": args.size, "repeats": args.repeats, "threads": torch.get_num_threads(), "results": results, **summary}, f, indent=2)


if __name__ == "__main__":
    main()
