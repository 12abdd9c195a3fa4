"""``qlora-guide``: a thin command line over the package's functions.

Each sub-command parses its flags and calls one plain function of a pipeline
module; the docs pages call the same functions. Modules are imported inside
the handlers so that ``qlora-guide --help`` answers without loading torch.

=============  ==========================================  =========================
command        what it does                                function
=============  ==========================================  =========================
check          what this machine can run                   system.check_system
estimate       peak memory of a fine-tune                  memory.estimate
quantize       save a 4-bit (or 8-bit) model               quantization.quantize_model
recipes        list or copy the bundled recipes            training.copy_recipe
train          QLoRA fine-tuning from a recipe             training.train
evaluate       perplexity, BLEU, chrF, speed               evaluation.evaluate_run
merge          merge an adapter into a plain model         deployment.merge_adapter
generate       one answer, streamed                        deployment.generate
chat           interactive chat                            deployment.chat
serve          OpenAI-compatible HTTP server               serving.serve
info           what a run or adapter folder holds          deployment.info
=============  ==========================================  =========================
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from qlora_guide import __version__, progress
from qlora_guide.errors import QLoRAGuideError

MODEL_HELP = "'smollm2-135m' (the embedded model), a local folder, or a hub id such as mistralai/Mistral-7B-v0.1"


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def emit(result: Any, as_json: bool, table: Callable[[Any], str]) -> None:
    """Print a result as a table, or as JSON for scripts."""
    if as_json:
        print_json(result.to_dict() if hasattr(result, "to_dict") else result)
    else:
        print(table(result))


# ------------------------------------------------------------------ handlers


def cmd_check(args: argparse.Namespace) -> None:
    from qlora_guide import system

    if args.rebuild_model:
        from qlora_guide.models import embedded_model_path

        print(f"embedded model converted again into {embedded_model_path(rebuild=True)}", file=sys.stderr)
    emit(system.check_system(), args.json, system.format_report)


def cmd_estimate(args: argparse.Namespace) -> None:
    from qlora_guide import memory

    estimate = memory.estimate(
        args.model,
        method=args.method,
        batch_size=args.batch,
        seq_len=args.seq,
        r=args.rank,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        double_quant=not args.no_double_quant,
        optimizer=args.optimizer,
    )
    emit(estimate, args.json, memory.format_estimate)


def cmd_quantize(args: argparse.Namespace) -> None:
    from qlora_guide import quantization

    result = quantization.quantize_model(
        args.model,
        args.out,
        quant_type=args.type,
        double_quant=args.double_quant,
        compute_dtype=args.compute_dtype,
        overwrite=args.overwrite,
    )
    emit(result, args.json, quantization.format_quantize_result)


def cmd_recipes(args: argparse.Namespace) -> None:
    from qlora_guide import config

    if args.show:
        print(config.recipe_path(args.show).read_text(encoding="utf-8"), end="")
        return
    if args.copy:
        from qlora_guide.training import copy_recipe

        name, dest = args.copy
        print(f"copied recipe '{name}' to {copy_recipe(name, dest, overwrite=args.overwrite)}")
        return
    rows = []
    for name, path in config.bundled_recipes().items():
        recipe = config.load_recipe(path)
        rows.append({"name": name, "model": recipe.model.name_or_path, "description": recipe.description, "path": str(path)})
    if args.json:
        print_json(rows)
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['description']}")
    print("\nShow one: qlora-guide recipes --show NAME    Copy one to edit: qlora-guide recipes --copy NAME DEST.yaml")


def cmd_train(args: argparse.Namespace) -> None:
    from qlora_guide import training

    result = training.train(args.recipe, overrides=args.set, output_dir=args.output, resume=args.resume, overwrite=args.overwrite)
    emit(result, args.json, training.format_train_result)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from qlora_guide import evaluation

    report = evaluation.evaluate_run(
        args.run,
        data=args.data,
        split=args.split,
        max_samples=args.max_samples,
        compare=args.compare,
        out_dir=args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        generation=not args.no_generation,
        performance=not args.no_speed,
        overwrite=args.overwrite,
    )
    emit(report, args.json, evaluation.format_report)


def cmd_merge(args: argparse.Namespace) -> None:
    from qlora_guide import deployment

    result = deployment.merge_adapter(args.adapter, args.out, overwrite=args.overwrite, dtype=args.dtype, check_parity=not args.no_parity)
    emit(result, args.json, deployment.format_merge_result)


def cmd_generate(args: argparse.Namespace) -> None:
    from qlora_guide import deployment

    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    deployment.generate(args.model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, system_prompt=args.system, stream=True)


def cmd_chat(args: argparse.Namespace) -> None:
    from qlora_guide import deployment

    deployment.chat(args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    system_prompt=args.system)


def cmd_serve(args: argparse.Namespace) -> None:
    from qlora_guide import serving

    serving.serve(args.model, host=args.host, port=args.port, max_tokens_limit=args.max_tokens_limit,
                  model_name=args.model_name, api_key=args.api_key or os.environ.get("QLORA_GUIDE_API_KEY"),
                  context_length=args.context_length)


def cmd_info(args: argparse.Namespace) -> None:
    from qlora_guide import deployment

    emit(deployment.info(args.dir), args.json, deployment.format_info)


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-guide",
        description="Quantize, fine-tune with QLoRA, evaluate and deploy language models.",
        epilog="Each command has its own --help. Docs: https://qlora-guide.readthedocs.io",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return p

    p = command("check", cmd_check, "report GPU, CUDA, bitsandbytes, RAM and disk, and what fits on this machine")
    p.add_argument("--rebuild-model", action="store_true", help="convert the embedded model into the cache again")

    p = command("estimate", cmd_estimate, "estimate the peak memory of a fine-tune from the model's config")
    p.add_argument("model", nargs="?", default="smollm2-135m", help=MODEL_HELP + ", or a bundled config name (mistral-7b, llama-2-70b, ...)")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="qlora")
    p.add_argument("--batch", type=int, default=1, help="per-device batch size (default 1)")
    p.add_argument("--seq", type=int, default=512, help="sequence length in tokens (default 512)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank r (default 64)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--no-double-quant", action="store_true")

    p = command("quantize", cmd_quantize, "save a bitsandbytes-quantized model that transformers reloads")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder (must not exist, unless --overwrite)")
    p.add_argument("--type", choices=["nf4", "fp4", "int8"], default="nf4")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True, help="quantize the absmax constants too")
    p.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--overwrite", action="store_true")

    p = command("recipes", cmd_recipes, "list the bundled recipes, or copy one out to edit")
    p.add_argument("--show", metavar="NAME", help="print a bundled recipe")
    p.add_argument("--copy", nargs=2, metavar=("NAME", "DEST"), help="copy a bundled recipe to DEST")
    p.add_argument("--overwrite", action="store_true")

    p = command("train", cmd_train, "fine-tune with QLoRA (or LoRA) from a YAML recipe")
    p.add_argument("recipe", help="a bundled recipe name (see `qlora-guide recipes`) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value, e.g. training.learning_rate=1e-4 (repeatable)")
    p.add_argument("--output", help="output folder (default: the recipe's output.dir)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder that already holds a run")

    p = command("evaluate", cmd_evaluate, "perplexity, BLEU, chrF and speed of a run, an adapter or a model")
    p.add_argument("run", help="a run or adapter folder, a merged folder, or " + MODEL_HELP)
    p.add_argument("--data", help="data to evaluate on (default: the run's recipe data, else the bundled dataset)")
    p.add_argument("--split", help="split to evaluate (default: the recipe's evaluation split, else test)")
    p.add_argument("--max-samples", type=int, help="evaluate on the first N examples only")
    p.add_argument("--batch-size", type=int, help="sequences per forward pass for perplexity")
    p.add_argument("--max-new-tokens", type=int, help="longest generated answer for BLEU and chrF")
    p.add_argument("--no-generation", action="store_true", help="perplexity only (no BLEU/chrF)")
    p.add_argument("--no-speed", action="store_true", help="skip the load-time and tokens/s measurements")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    p.add_argument("--compare", action="store_true", help="also evaluate the bf16 base, the 4-bit base and the merged model")
    p.add_argument("--out", help="write report.json and report.md into this folder")

    p = command("merge", cmd_merge, "dequantize the base, merge the adapter in float32, save a plain model")
    p.add_argument("adapter", help="a run or adapter folder")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default float32: bfloat16 halves the size but its rounding can "
                   "lose much of a small LoRA update; the merge prints how much)")
    p.add_argument("--no-parity", action="store_true", help="skip the merged-vs-adapter parity check")

    for name, handler, text in (("generate", cmd_generate, "generate one answer, streamed"), ("chat", cmd_chat, "chat interactively (/reset, /exit)")):
        p = command(name, handler, text, json_flag=False)
        if name == "generate":
            p.add_argument("prompt", help="the user message ('-' reads standard input)")
        p.add_argument("--model", default="smollm2-135m", help="an adapter folder, a merged folder, or " + MODEL_HELP)
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature > 0)")
        p.add_argument("--system", help="a system prompt")

    p = command("serve", cmd_serve, "serve a model over an OpenAI-compatible HTTP API", json_flag=False)
    p.add_argument("model", nargs="?", default="smollm2-135m", help="an adapter folder, a merged folder, or " + MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--model-name", help="the model id clients send (default: the folder or model name)")
    p.add_argument("--api-key", help="require this bearer token (or set QLORA_GUIDE_API_KEY)")
    p.add_argument("--context-length", type=int, help="longest prompt + answer in tokens (default: the model's)")

    p = command("info", cmd_info, "show what a run or adapter folder holds")
    p.add_argument("dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qlora-guide`` script: one-line errors, exit status 2."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with progress.quiet(getattr(args, "json", False)):  # JSON on stdout is for scripts: no bars on stderr either
            args.handler(args)
    except QLoRAGuideError as err:
        print(f"qlora-guide {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"qlora-guide {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
