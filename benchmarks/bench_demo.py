"""The demo fine-tune, before and after: does the tuned model answer better than the bf16 base?

    python benchmarks/bench_demo.py                 # both recipes, about 10 minutes on a 2-core CPU
    QLORA_GUIDE_CPU_BF16=0 python benchmarks/bench_demo.py   # on the float32 path

"before" is the demo recipe as it was (40 steps at 5e-4, greedy decoding
without a repetition penalty); "after" is the bundled ``demo`` recipe. Each
is trained into a temporary folder, merged in float32 (the same model as the
4-bit + adapter one, checked by the merge), and answers the 46 questions of
the test split; the bf16 base answers them with the same decoding. Printed
side by side: chrF, the share of answers in the question's language, the
repeated 4-gram share, each as tuned minus base with its paired bootstrap 95 %
interval, and the validation loss.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

BEFORE = ["training.max_steps=40", "training.learning_rate=5e-4", "training.eval_steps=20", "training.save_steps=20",
          "evaluation.repetition_penalty=1.0", "training.report_to=[none]"]
AFTER = ["training.report_to=[none]"]


def measure(name: str, overrides: list[str], work: Path) -> dict:
    """Train, merge and score one recipe variant against the bf16 base."""
    from qlora_guide import deployment, evaluation, training
    from qlora_guide.config import load_recipe
    from qlora_guide.models import load_model
    from qlora_guide.precision import cpu_compute_dtype

    recipe = load_recipe("demo", overrides)
    result = training.train(recipe, output_dir=work / name)
    merged = deployment.merge_adapter(result.adapter_dir, work / f"{name}-merged", check_parity=False)
    examples = evaluation.load_split("qlora-faq", "test")
    settings = {"max_new_tokens": recipe.evaluation.max_new_tokens, "batch_size": 48,
                "repetition_penalty": recipe.evaluation.repetition_penalty}
    tuned = deployment.load_any(merged.output_dir)
    rows = [
        {"variant": "bf16 base", **evaluation.evaluate_model(load_model(dtype=cpu_compute_dtype("bfloat16")), tuned.tokenizer, examples, **settings)},
        {"variant": "fine-tuned", **evaluation.evaluate_model(tuned.model, tuned.tokenizer, examples, **settings)},
    ]
    differences = {d["measure"]: d for d in evaluation.compare_to_reference(rows, examples)}
    return {"differences": differences, "metrics": result.metrics}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as folder:
        results = {name: measure(name, overrides, Path(folder)) for name, overrides in (("before", BEFORE), ("after", AFTER))}
    print(f"\n{'':<28}" + "".join(f"{name:>36}" for name in results))
    for measure_name in ("chrf", "same_language_pct", "repeated_4gram_pct", "perplexity"):
        cells = []
        for r in results.values():
            d = r["differences"][measure_name]
            op = "/" if d["ratio"] else "-"
            cells.append(f"{d['b']:.2f} {op} {d['a']:.2f} = {d['difference']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]")
        print(f"{measure_name + ' (tuned vs base)':<28}" + "".join(f"{c:>36}" for c in cells))
    cells = [f"{r['metrics']['initial_eval_loss']:.3f} -> {r['metrics']['eval_loss']:.3f}" for r in results.values()]
    print(f"{'validation loss':<28}" + "".join(f"{c:>36}" for c in cells))
    cells = [f"{r['metrics']['train_runtime']:.0f} s" for r in results.values()]
    print(f"{'training time':<28}" + "".join(f"{c:>36}" for c in cells))


if __name__ == "__main__":
    main()
