"""Where the time of one demo training step goes, on this CPU (torch.profiler, grouped by kind of work).

    python benchmarks/profile_training_step.py                     # the precision this CPU trains in
    QLORA_GUIDE_CPU_BF16=0 python benchmarks/profile_training_step.py   # the float32 path

One batch of the ``demo`` recipe (4 x 256 packed tokens), through the model the
training code builds (4-bit base, LoRA adapters), the answer-only loss the
trainer uses, backward and an AdamW step; two warm-up steps, then one profiled
step. Operators are grouped: matrix products, 4-bit dequantization,
attention, output layer and loss, optimizer, element-wise work, the rest.
"""

from __future__ import annotations

import time
from collections import defaultdict

GROUPS = (
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("4-bit dequantization", ("bitsandbytes::",)),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("output layer and loss", ("log_softmax", "cross_entropy", "nll_loss")),
    ("optimizer", ("adam", "_foreach")),
    ("element-wise", ("aten::mul", "aten::add", "aten::silu", "aten::div", "aten::sqrt", "aten::rsqrt", "aten::pow",
                      "aten::mean", "aten::neg", "aten::cat", "aten::sum", "aten::fill_", "aten::copy_", "aten::zero_")),
)


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(key in name for key in keys):
            return group
    return "other"


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from qlora_guide import training
    from qlora_guide.config import load_recipe
    from qlora_guide.data import prepare_data
    from qlora_guide.models import load_tokenizer

    recipe = load_recipe("demo")
    precision = training.resolve_precision(recipe)
    data = prepare_data(recipe.data, load_tokenizer(), recipe.training.per_device_train_batch_size)
    model = training.build_model(recipe, precision)
    model.train()
    batch = data.collator([data.train[i] for i in range(recipe.training.per_device_train_batch_size)])
    labels = batch.pop("labels")
    head = training.AnswerOnlyLogits(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.bf16)

    def step() -> None:
        with autocast:
            loss = head.loss(model, batch, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2):
        step()
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[group_of(event.key)] += event.self_cpu_time_total / 1e6
    everything = sum(totals.values())
    tokens = int(batch["input_ids"].numel())
    print(f"one step: {wall:.2f} s for {tokens} tokens ({tokens / wall:.0f} tokens/s), "
          f"compute {precision.compute_dtype}, bf16 autocast {precision.bf16}")
    print(f"{'kind of work':<24} {'seconds':>8} {'share':>7}")
    for group, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{group:<24} {seconds:8.2f} {100 * seconds / everything:6.1f} %")


if __name__ == "__main__":
    main()
