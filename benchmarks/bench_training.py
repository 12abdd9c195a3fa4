"""Training throughput: qlora-guide's pipeline against the guide's literal recipe, side by side.

Both runs fine-tune the embedded SmolLM2-135M-Instruct (4-bit NF4) on the same
examples of the bundled dataset, once each, in this process:

* guide   the ``mistral-7b`` recipe (the guide's settings: r=64, alpha=16, seven
          targets, batch 4 x 4, lr 2e-4, gradient checkpointing) with the data
          handling of the guide's code: every batch padded to its longest
          example, no packing, the loss on every token (prompt included).
* ours    the ``demo`` recipe as ``qlora-guide train demo`` runs it: packed rows
          with a block-diagonal attention mask, loss (and output-layer logits)
          on the answers only, r=16, no adapter dropout and no gradient
          checkpointing on a model this small.

Reported: non-padding tokens trained per second (tokens the collator delivered,
padding excluded, divided by the Trainer's training time; each recipe runs
``--repeats`` times in the order guide, ours, ours, guide so that a load that
drifts during the benchmark weighs on both alike), padding, and the validation
loss on the answers of the bundled validation split after training (the same
measure for both, computed here, not by either run).

    python benchmarks/bench_training.py                              # 96 examples, 2 runs each
    python benchmarks/bench_training.py --examples 32 --repeats 1    # quicker

On a CUDA GPU, ``--mistral-shapes`` instead runs the ``mistral-7b`` recipe, as
is, for a few steps on a randomly initialised model of Mistral-7B's shapes
(32 layers, hidden 4096, MLP 14336, 32 query and 8 key/value heads; the
vocabulary is the tokenizer's) and reports tokens/s and peak GPU memory:

    python benchmarks/bench_training.py --mistral-shapes --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_subset(folder: Path, examples: int, validation: int, seed: int) -> None:
    """The same training examples for both runs, and a validation file."""
    from qlora_guide.config import DataConfig
    from qlora_guide.data import load_examples

    splits = load_examples(DataConfig(path="qlora-faq"))
    rows = list(splits["train"])
    random.Random(seed).shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    for name, subset in (("train", rows[:examples]), ("validation", list(splits["validation"])[:validation])):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in subset:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def recipes(data_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """Each run as (bundled recipe, overrides): one epoch over the same examples, no evaluation inside."""
    common = [f"data.path={data_dir}", "data.validation_split=null", "training.num_train_epochs=1",
              "training.max_steps=-1", "training.save_steps=100000", "training.report_to=[none]",
              "training.early_stopping_patience=null"]
    guide = ["model.name_or_path=smollm2-135m", "data.packing=false", "data.train_on_prompt=true",
             "data.max_length=512"]
    return {"guide": ("mistral-7b", common + guide), "ours": ("demo", common)}


def answer_loss(adapter: Path | None, data_dir: Path, batch_size: int = 4) -> tuple[float, int]:
    """Validation loss on answer tokens only, for an adapter (or the base model when adapter is None)."""
    from peft import PeftModel

    from qlora_guide.config import DataConfig, load_recipe
    from qlora_guide.data import Collator, load_examples, tokenize
    from qlora_guide.models import load_model, load_tokenizer
    from qlora_guide.precision import use_differentiable_4bit_kernel
    from qlora_guide.training import resolve_precision, validation_loss

    recipe = load_recipe("demo")
    precision = resolve_precision(recipe)
    tokenizer = load_tokenizer("smollm2-135m")
    data = DataConfig(path=str(data_dir), max_length=512, packing=False)
    rows, _ = tokenize(load_examples(data)["validation"], tokenizer, data)
    collator = Collator(tokenizer.pad_token_id)
    batches = [collator([rows[j] for j in range(i, min(i + batch_size, len(rows)))]) for i in range(0, len(rows), batch_size)]
    quantization = recipe.quantization.model_copy(update={"bnb_4bit_compute_dtype": precision.compute_dtype})
    model = load_model("smollm2-135m", quantization=quantization, dtype=precision.model_dtype)
    use_differentiable_4bit_kernel(model)  # same kernels as in training
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    import torch

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.bf16 and precision.device == "cpu")

    return validation_loss(model, batches, autocast)


def mistral_shapes(steps: int, tokenizer_path: str | None, work: Path) -> int:
    """Run the mistral-7b recipe for a few steps on a random model of Mistral-7B's shapes (needs CUDA)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from qlora_guide.models import load_tokenizer
    from qlora_guide.training import train

    if not torch.cuda.is_available():
        print("--mistral-shapes needs a CUDA GPU")
        return 2
    tokenizer = load_tokenizer(tokenizer_path or "smollm2-135m")
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                           sliding_window=4096, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = work / "mistral-7b-random"
    started = time.time()
    with torch.device("cuda"):
        model = MistralForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    print(f"random Mistral-7B-shaped model: {params / 1e9:.2f} B parameters, built and saved in {time.time() - started:.0f} s", flush=True)
    torch.cuda.reset_peak_memory_stats()
    overrides = [f"model.name_or_path={folder}", f"training.max_steps={steps}", "training.logging_steps=1",
                 "training.save_steps=100000", "data.validation_split=null", "training.report_to=[none]"]
    result = train("mistral-7b", overrides, output_dir=work / "mistral-run")
    history = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [h for h in history if "loss" in h and "train_tokens_seen" in h]
    m = result.metrics
    print(f"\nmistral-7b recipe on {torch.cuda.get_device_name()}: r=64 on 7 modules, batch 4 x 4, max_length 1024, packed")
    print(f"trainable params       {result.trainable_params:,} ({result.trainable_percent:.2f}%)")
    print(f"steps                  {m['global_step']} in {m['train_runtime']:.1f} s")
    print(f"tokens/s (all steps)   {m['train_tokens'] / m['train_runtime']:.0f}")
    if len(logged) >= 3:  # steady state: from the end of step 2 to the last step
        first, last = logged[1], logged[-1]
        rate = (last["train_tokens_seen"] - first["train_tokens_seen"]) / (last["time"] - first["time"])
        print(f"tokens/s (steady)      {rate:.0f}  (steps {first['step'] + 1}-{last['step']})")
    print(f"peak allocated / reserved  {m['mem_cuda_peak_allocated_mb'] / 1024:.2f} / {m['mem_cuda_peak_reserved_mb'] / 1024:.2f} GiB")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96, help="training examples, the same for both runs")
    parser.add_argument("--validation", type=int, default=46, help="validation examples for the loss after training")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, in the order guide, ours, ours, guide, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--mistral-shapes", action="store_true", help="CUDA: the mistral-7b recipe on a random Mistral-7B-shaped model")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps for --mistral-shapes")
    parser.add_argument("--tokenizer", help="tokenizer folder for --mistral-shapes (default: the embedded model's)")
    args = parser.parse_args()

    from qlora_guide.training import train

    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    if args.mistral_shapes:
        return mistral_shapes(args.steps, args.tokenizer, work)
    data_dir = work / "data"
    write_subset(data_dir, args.examples, args.validation, args.seed)
    figures: dict[str, dict] = {}
    base_loss, _ = answer_loss(None, data_dir)
    runs = recipes(data_dir)
    order = (["guide", "ours", "ours", "guide"] * args.repeats)[: 2 * args.repeats]  # ABBA: a drifting load hits both alike
    for i, name in enumerate(order):
        recipe, overrides = runs[name]
        result = train(recipe, overrides, output_dir=work / f"{name}-{i}")
        m = result.metrics
        if name not in figures:  # same seed, same data: the adapter (and its validation loss) is the same every time
            loss, _ = answer_loss(result.adapter_dir, data_dir)
            figures[name] = {
                "recipe": recipe,
                "examples": result.train_stats.examples,
                "sequences": result.train_stats.sequences,
                "optimizer_steps": m["global_step"],
                "tokens": m["train_tokens"],
                "padding_tokens": m["train_padding_tokens"],
                "loss_tokens": result.train_stats.answer_tokens,
                "runs_seconds": [],
                "validation_answer_loss": loss,
            }
        figures[name]["runs_seconds"].append(m["train_runtime"])
    for f in figures.values():
        f["train_seconds"] = sum(f["runs_seconds"]) / len(f["runs_seconds"])
        f["tokens_per_second"] = f["tokens"] / f["train_seconds"]
        f["runs_tokens_per_second"] = [f["tokens"] / t for t in f["runs_seconds"]]
    guide, ours = figures["guide"], figures["ours"]
    rows = [
        ("training examples", "examples", "{:d}"),
        ("rows fed to the model", "sequences", "{:d}"),
        ("optimizer steps", "optimizer_steps", "{:d}"),
        ("non-padding tokens", "tokens", "{:,}"),
        ("padding tokens", "padding_tokens", "{:,}"),
        ("tokens with a loss", "loss_tokens", "{:,}"),
        ("training time (s, mean)", "train_seconds", "{:.1f}"),
        ("non-padding tokens / s", "tokens_per_second", "{:.1f}"),
        ("validation loss (answers)", "validation_answer_loss", "{:.4f}"),
    ]
    print(f"\nqlora-guide training benchmark: SmolLM2-135M 4-bit, {args.examples} examples, threads={_threads()}")
    print(f"{'':28}{'guide (literal)':>18}{'qlora-guide':>16}")
    for label, key, fmt in rows:
        print(f"{label:28}{fmt.format(guide[key]):>18}{fmt.format(ours[key]):>16}")
    print(f"{'validation loss before':28}{base_loss:>18.4f}{base_loss:>16.4f}")
    print(f"{'tokens / s of each run':28}{' '.join(f'{x:.1f}' for x in guide['runs_tokens_per_second']):>18}"
          f"{' '.join(f'{x:.1f}' for x in ours['runs_tokens_per_second']):>16}")
    speedup = ours["tokens_per_second"] / guide["tokens_per_second"]
    print(f"\nspeed-up (non-padding tokens/s): {speedup:.2f}x; validation loss: "
          f"{'equal or lower' if ours['validation_answer_loss'] <= guide['validation_answer_loss'] else 'HIGHER'} with qlora-guide")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "base_validation_loss": base_loss, "speedup": speedup}, indent=2))
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
