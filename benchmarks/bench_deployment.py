"""Generation speed of three deployments of one adapter, and the server's throughput under concurrent clients.

    python benchmarks/bench_deployment.py                      # a random r=64 adapter on the embedded model
    python benchmarks/bench_deployment.py --adapter runs/qlora --tokens 64 --repeats 5 --out bench.json

Part 1, one process, the three models loaded side by side and measured in
turn, round after round (so a busy machine slows them alike), each answering
the same prompt with exactly ``--tokens`` greedy tokens:

* **merged float32**: the adapter merged into the dequantized NF4 weights, plain float32;
* **4-bit + adapter**: the NF4 base with the LoRA layers beside it, as trained;
* **4-bit merged-back**: the merged model quantized to NF4 again.

The median of ``--repeats`` rounds is reported: generated tokens per second
(prompt processing included), decode tokens per second (after the first
token), time to first token, and the weights' memory.

Part 2 serves one of them (``--server-model``, default the merged model) with
:func:`qlora_guide.deployment.serving.make_server` on a free loopback port, and sends
``--requests`` chat requests (greedy, ``--server-tokens`` tokens at most)
from 1, 4 and 16 concurrent clients: completion tokens per second over the
wall time, requests per second, and latency percentiles. It does so twice on
the same loaded model, side by side: with ``max_batch=1`` (one request at a
time: throughput stays flat while latency grows with the clients) and with
the server's batching (``--max-batch``, default 16), and reports the ratio of
16-client to 1-client throughput for each.

``--part server`` skips part 1.

Without ``--adapter`` a random adapter (r=64, lora_alpha=16, the guide's seven
target modules) is made and merged in a temporary folder: speed does not
depend on what the adapter learnt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from qlora_guide.deployment.load_test import QUESTIONS

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(folder: Path, r: int = 64, lora_alpha: int = 16) -> Path:
    """A random LoRA adapter on the embedded model, saved as `qlora-guide train` lays a run out."""
    import peft
    import torch

    from qlora_guide.config import LoraConfig, Recipe
    from qlora_guide.models import load_model, load_tokenizer

    torch.manual_seed(0)
    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=TARGETS, task_type="CAUSAL_LM", init_lora_weights=False)
    model = peft.get_peft_model(load_model(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    model.save_pretrained(folder / "adapter")
    load_tokenizer().save_pretrained(folder / "adapter")
    (folder / "recipe.yaml").write_text(Recipe(name="bench", lora=LoraConfig(r=r, lora_alpha=lora_alpha)).to_yaml())
    (folder / "manifest.json").write_text(json.dumps({"base_model": "smollm2-135m"}))
    return folder


def bench_variants(adapter: Path, merged: Path, tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Part 1: the three models, measured in turn for ``repeats`` rounds; medians."""
    from qlora_guide import deployment
    from qlora_guide.evaluation import measure_generation

    models = {
        "merged float32": deployment.load_any(merged),
        "4-bit + adapter": deployment.load_any(adapter),
        "4-bit merged-back": deployment.load_merged_4bit(merged),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for _ in range(repeats):  # each measurement starts with a short untimed warm-up generation
        for name, lm in models.items():
            runs[name].append(measure_generation(lm.model, lm.tokenizer, QUESTIONS[0], max_new_tokens=tokens))
    rows = []
    for name, lm in models.items():
        row: dict[str, Any] = {"variant": name, "weights_mb": round(lm.model.get_memory_footprint() / 2**20, 1), "load_s": round(lm.load_seconds, 2)}
        for key in ("tokens_per_s", "decode_tokens_per_s", "ttft_s"):
            row[key] = round(statistics.median(r[key] for r in runs[name]), 4)
        row["generated_tokens"] = runs[name][0]["generated_tokens"]
        rows.append(row)
    return rows


def bench_server(lm: Any, clients_list: list[int], requests_per_run: int, max_tokens: int, max_batch: int) -> list[dict[str, Any]]:
    """Part 2: chat requests from 1, 4, 16... concurrent clients against one server generating ``max_batch`` at most together."""
    from qlora_guide.deployment.load_test import measure_load
    from qlora_guide.deployment.serving import make_server

    with make_server(lm, max_tokens_limit=max_tokens, max_queue=max(clients_list) * 2, max_batch=max_batch) as server:
        server.start()
        rows = measure_load(server, clients_list, requests_per_run, max_tokens)
    return [{key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()} for row in rows]


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row.get(key, "")) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="a run or adapter folder (default: a random r=64 adapter on the embedded model)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per measurement (default 48)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the three models; the median is kept (default 3)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients (default 1 4 16)")
    parser.add_argument("--requests", type=int, default=48, help="requests per client count (default 48)")
    parser.add_argument("--max-batch", type=int, default=16, help="the batching server's max_batch (default 16)")
    parser.add_argument("--part", choices=["all", "server"], default="all", help="server: skip part 1 (default all)")
    parser.add_argument("--server-tokens", type=int, default=24, help="max_tokens of each server request (default 24)")
    parser.add_argument("--server-model", choices=["merged", "adapter"], default="merged", help="what the server serves (default: the merged model)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()

    import torch

    from qlora_guide.deployment import merge_adapter

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
    }
    print("machine:", json.dumps(machine))
    with tempfile.TemporaryDirectory(prefix="bench-deployment-") as tmp:
        work = Path(tmp)
        adapter = Path(args.adapter) if args.adapter else random_adapter(work / "run")
        start = time.perf_counter()
        merged = Path(merge_adapter(adapter, work / "merged", check_parity=False).output_dir)
        print(f"merged in {time.perf_counter() - start:.1f} s")

        variants = []
        if args.part == "all":
            variants = bench_variants(adapter, merged, args.tokens, args.repeats)
            print(f"\nGeneration, {args.tokens} greedy tokens, median of {args.repeats} rounds:\n")
            print(table(variants, [("variant", "model"), ("tokens_per_s", "tokens/s"), ("decode_tokens_per_s", "decode tokens/s"),
                                   ("ttft_s", "TTFT s"), ("weights_mb", "weights MiB"), ("load_s", "load s")]))
            fastest = max(v["tokens_per_s"] for v in variants)
            print("\nrelative speed: " + ", ".join(f"{v['variant']} {v['tokens_per_s'] / fastest:.2f}" for v in variants))

        from qlora_guide.deployment import load_any

        lm = load_any(merged if args.server_model == "merged" else adapter)
        server = [row for max_batch in (1, args.max_batch) for row in bench_server(lm, args.clients, args.requests, args.server_tokens, max_batch)]
        print(f"\nServer ({args.server_model}, {lm.model.dtype}), chat requests of at most {args.server_tokens} tokens, "
              f"one at a time (max_batch 1) and batched (max_batch {args.max_batch}):\n")
        print(table(server, [("max_batch", "max_batch"), ("clients", "clients"), ("requests", "requests"), ("tokens_per_s", "tokens/s"),
                             ("requests_per_s", "requests/s"), ("latency_p50_s", "p50 latency s"), ("latency_p95_s", "p95 latency s"),
                             ("wall_s", "wall s")]))
        lo, hi = min(args.clients), max(args.clients)
        for max_batch in (1, args.max_batch):
            rate = {row["clients"]: row["tokens_per_s"] for row in server if row["max_batch"] == max_batch}
            print(f"max_batch {max_batch}: {hi} clients give {rate[hi] / rate[lo]:.2f}x the tokens/s of {lo}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "args": vars(args), "generation": variants, "server": server}, indent=2))
        print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
