"""``qlora-guide``: a thin command line over the package's functions.

Each command is one plain function of a pipeline module, listed in
:data:`COMMANDS`; the docs pages call the same functions. Its flags are read
from the function's signature: a parameter ``max_new_tokens: int = 256``
becomes ``--max-new-tokens`` (an integer, 256 by default), a ``bool`` becomes
a switch, a ``Literal`` a choice, a parameter without a default a positional
argument. Their help comes from :data:`HELP`, one sentence per parameter name
for every command. So a new parameter is a new flag, with the same name in
Python and on the command line.

Modules are imported only for the command being run, so that
``qlora-guide --help`` answers without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qlora_guide import __version__, progress
from qlora_guide.errors import QLoRAGuideError

MODEL_HELP = "'smollm2-135m' (the embedded model), a local folder, or a hub id such as mistralai/Mistral-7B-v0.1"
EMBEDDED = "smollm2-135m"


@dataclass(frozen=True)
class Command:
    """One verb: the function it runs and how its result is printed."""

    function: str  # "module:name" of the function the command calls
    summary: str
    table: str | None = None  # "module:name" that formats the result as text; None: the function prints
    positional: tuple[str, ...] | None = None  # default: the parameters without a default
    flags: dict[str, str] = field(default_factory=dict)  # parameter -> flag, where the flag reads better
    defaults: dict[str, Any] = field(default_factory=dict)  # command-line defaults of required parameters
    hidden: tuple[str, ...] = ()  # parameters for Python callers only
    stdin: tuple[str, ...] = ()  # positional arguments where "-" reads standard input


COMMANDS: dict[str, Command] = {
    "check": Command("qlora_guide.system:check_system",
                     "report GPU, CUDA, bitsandbytes, RAM and disk, and what fits on this machine",
                     table="qlora_guide.system:format_report"),
    "estimate": Command("qlora_guide.memory:estimate", "estimate the peak memory of a fine-tune from the model's config",
                        table="qlora_guide.memory:format_estimate", positional=("model",)),
    "quantize": Command("qlora_guide.quantization:quantize_model",
                        "save a bitsandbytes-quantized model that transformers reloads",
                        table="qlora_guide.quantization:format_quantize_result", positional=("name_or_path",)),
    "recipes": Command("qlora_guide.recipes:recipes", "list the bundled recipes, show one, or copy one out to edit",
                       table="qlora_guide.recipes:format_recipes"),
    "doctor": Command("qlora_guide.training.preflight:doctor",
                      "show a recipe's first training examples as the model sees them and check labels, EOS, padding, "
                      "chat template and precision before a run (exit status 1 on an error)",
                      table="qlora_guide.training.preflight:format_preflight", flags={"overrides": "set"}),
    "train": Command("qlora_guide.training:train", "fine-tune with QLoRA (or LoRA) from a YAML recipe",
                     table="qlora_guide.training:format_train_result", flags={"overrides": "set"}),
    "launch": Command("qlora_guide.training.launch:launch",
                      "train a recipe on several processes of this machine with accelerate launch (DDP; --config-file "
                      "for FSDP or DeepSpeed)", table="qlora_guide.training.launch:format_launch_result",
                      flags={"overrides": "set"}, hidden=("timeout",)),
    "evaluate": Command("qlora_guide.evaluation:evaluate_run",
                        "perplexity, BLEU, chrF and speed of a run, an adapter or a model",
                        table="qlora_guide.evaluation:format_report"),
    "merge": Command("qlora_guide.deployment:merge_adapter",
                     "dequantize the base, merge the adapter in float32, save a plain model (in float32 by default: "
                     "bfloat16 halves the size, but its rounding can lose much of a small update; the merge "
                     "says how much)",
                     table="qlora_guide.deployment:format_merge_result", positional=("adapter_dir",),
                     hidden=("parity_prompts",)),
    "export": Command("qlora_guide.deployment.export:export",
                      "write a merged model (or a run, merged first) as a GGUF file for llama.cpp and Ollama, "
                      "and check it against the merged model",
                      table="qlora_guide.deployment.export:format_export", positional=("source",)),
    "generate": Command("qlora_guide.deployment:generate", "generate one answer, streamed", positional=("prompt",),
                        flags={"model_ref": "model"}, defaults={"model_ref": EMBEDDED},
                        hidden=("stream", "quantization", "out"), stdin=("prompt",)),
    "chat": Command("qlora_guide.deployment:chat", "chat interactively (/reset, /exit)", positional=(),
                    flags={"model_ref": "model"}, defaults={"model_ref": EMBEDDED},
                    hidden=("quantization", "input", "output")),
    "serve": Command("qlora_guide.deployment.serving:serve", "serve a model over an OpenAI-compatible HTTP API",
                     positional=("model_ref",), flags={"model_ref": "model"}, defaults={"model_ref": EMBEDDED},
                     hidden=("quantization", "verbose")),
    "info": Command("qlora_guide.deployment:info", "show what a run, adapter or merged folder holds",
                    table="qlora_guide.deployment:format_info"),
}

# One sentence per parameter name, whatever the command: the same name means the same thing everywhere.
HELP = {
    "model": MODEL_HELP + " (for estimate: also a bundled config name such as mistral-7b or llama-2-70b)",
    "name_or_path": MODEL_HELP,
    "model_ref": "an adapter folder, a merged folder, or " + MODEL_HELP + " (serve: also several adapter folders of one base)",
    "output_dir": "output folder (it must not exist, or be empty, unless --overwrite)",
    "overwrite": "replace an earlier output of this command",
    "rebuild_model": "convert the embedded model into the cache again",
    "method": "what is trained: every weight, LoRA adapters on a 16-bit base, or adapters on a 4-bit base",
    "batch_size": "sequences per forward pass (per device)",
    "seq_len": "sequence length in tokens",
    "r": "LoRA rank",
    "target_modules": "a module that gets an adapter (repeatable; default: the guide's seven projections)",
    "gradient_checkpointing": "recompute activations in the backward pass instead of storing them",
    "double_quant": "quantize the absmax constants too",
    "blocksize": "weights per absmax constant",
    "optimizer": "the optimizer whose states are counted",
    "dtype": "dtype of the weights",
    "lora_dropout": "dropout on the adapters' input",
    "device": "cuda counts the CUDA context; cpu does not",
    "adapter_dtype": "dtype of the LoRA weights and their gradients",
    "quant_type": "4-bit data type, or int8 for LLM.int8()",
    "compute_dtype": "dtype the 4-bit weights are dequantized to for each product",
    "show": "print the bundled recipe NAME",
    "copy": "copy the bundled recipe NAME to DEST",
    "recipe": "a bundled recipe name (see `qlora-guide recipes`) or a YAML file",
    "overrides": "override a recipe value, e.g. training.learning_rate=1e-4 (repeatable)",
    "examples": "training examples to show as masked and learnt text",
    "num_processes": "processes to train on, one per GPU (on a CPU machine, each gets its share of the cores)",
    "config_file": "an accelerate config file (e.g. the FSDP one `qlora-guide recipes --copy llama-3-70b-fsdp` writes)",
    "resume": "continue from the latest complete checkpoint",
    "run": "a run or adapter folder, a merged folder, or " + MODEL_HELP,
    "data": "data to evaluate on (default: the run's recipe data, else the bundled dataset)",
    "split": "split to evaluate (default: the recipe's evaluation split, else test)",
    "max_samples": "evaluate on the first N examples only",
    "compare": "also evaluate the bf16 base, the 4-bit base and the merged model",
    "generation": "generate answers for BLEU and chrF (--no-generation: perplexity only)",
    "performance": "measure load time and tokens/s",
    "adapter_dir": "a run or adapter folder",
    "source": "a merged model folder, or a run or adapter folder (merged first, in float32)",
    "out": "the file to write (it must not exist, unless --overwrite)",
    "format": "file format",
    "outtype": "type of the weights in the file: q8_0 (8-bit blocks), f16 or f32; norms stay float32",
    "check_parity": "check the result against the model it is made from: logits and greedy answers",
    "compare_naive": "also measure what a merge into the 4-bit weights would lose",
    "parity_tokens": "greedy tokens generated per prompt by the parity check",
    "prompt": "the user message ('-' reads standard input)",
    "max_new_tokens": "longest answer in tokens",
    "temperature": "0 means greedy decoding",
    "top_p": "nucleus sampling threshold (with --temperature > 0)",
    "system_prompt": "a system prompt",
    "host": "address to bind (127.0.0.1: this machine only)",
    "port": "TCP port",
    "max_tokens_limit": "largest max_tokens a request may ask for",
    "model_name": "the model id clients send (default: the folder or model name)",
    "api_key": "require this bearer token (default: $QLORA_GUIDE_API_KEY)",
    "max_body_bytes": "largest request body in bytes",
    "context_length": "longest prompt + answer in tokens (default: the model's)",
    "max_batch": "requests generated together at most (1: one at a time)",
    "path": "a run, adapter or merged folder",
}
METAVARS = {"copy": ("NAME", "DEST")}  # the words of flags that take several


def resolve(target: str) -> Callable[..., Any]:
    """The function named by ``"module:name"``, imported now."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _alternatives(annotation: Any) -> list[Any]:
    """The members of a union annotation (``None`` left out), or the annotation alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def value_kind(annotation: Any) -> tuple[str | None, dict[str, Any]]:
    """How a command line gives a value of this type: a kind and its extra ``add_argument`` settings.

    The kinds are ``bool`` (a switch), ``list`` (a repeatable flag),
    ``tuple`` (several words at once), ``int``, ``float`` and ``str``; None
    when no string on a command line can stand for the value.
    """
    parts = _alternatives(annotation)
    origins = [typing.get_origin(a) or a for a in parts]
    literal = [a for a in parts if typing.get_origin(a) is typing.Literal]
    if literal:
        choices = tuple(c for a in literal for c in typing.get_args(a))
        return type(choices[0]).__name__, {"choices": choices}
    for kind in (bool, list, int, float):
        if kind in origins:
            return kind.__name__, {}
    if tuple in origins:
        items = typing.get_args(parts[origins.index(tuple)])
        return "tuple", {"nargs": len(items) if items and Ellipsis not in items else "+"}
    if any(a is Any or a is str or (isinstance(a, type) and issubclass(a, os.PathLike)) for a in origins):
        return "str", {}
    return None, {}


def argument(param: inspect.Parameter, annotation: Any, command: Command,
             positional: bool) -> tuple[str, dict[str, Any]] | None:
    """The name and settings of ``add_argument`` for one parameter; None when a command line cannot give it."""
    kind, kwargs = value_kind(annotation)
    if kind is None:
        return None
    default = command.defaults.get(param.name, param.default)
    required = default is inspect.Parameter.empty
    name = command.flags.get(param.name, param.name)
    text = HELP.get(param.name, "")
    if not (required or default is None or isinstance(default, bool) or default == ()):
        text += f" (default: {default})"
    kwargs["help"] = text.strip()
    if kind == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction if default is True else "store_true"
    elif kind == "list":
        kwargs["action"] = "append"
    elif kind in ("int", "float"):
        kwargs["type"] = int if kind == "int" else float
    if kind == "tuple" and param.name in METAVARS:
        kwargs["metavar"] = METAVARS[param.name]
    if not required:
        kwargs["default"] = None if kind == "list" else default
    if positional:
        kwargs["metavar"] = name.upper()
        if not required:
            kwargs["nargs"] = "*" if kind == "tuple" else "?"
        return param.name, kwargs
    kwargs["dest"] = param.name
    kwargs["required"] = required
    if kind not in ("bool", "tuple") and "choices" not in kwargs:
        kwargs["metavar"] = name.upper()
    return "--" + name.replace("_", "-"), kwargs


def type_hints(function: Callable[..., Any]) -> dict[str, Any]:
    """The function's annotations, evaluated; one that names a type its module does not import stays unknown."""
    try:
        return typing.get_type_hints(function)
    except NameError:
        hints = {}
        for name, text in function.__annotations__.items():
            try:
                hints[name] = typing.get_type_hints(types.SimpleNamespace(__annotations__={name: text}),
                                                    globalns=function.__globals__)[name]
            except NameError:
                hints[name] = None
        return hints


def add_arguments(parser: argparse.ArgumentParser, command: Command) -> None:
    """Give ``parser`` one argument per parameter of the command's function."""
    function = resolve(command.function)
    hints = type_hints(function)
    params = [p for p in inspect.signature(function).parameters.values() if p.name not in command.hidden]
    positional = command.positional
    if positional is None:
        positional = tuple(p.name for p in params if p.default is inspect.Parameter.empty)
    for param in params:
        spec = argument(param, hints.get(param.name, str), command, param.name in positional)
        if spec is None:
            if param.default is inspect.Parameter.empty:
                raise TypeError(f"{command.function}: required parameter {param.name!r} has no command-line form")
            continue
        parser.add_argument(spec[0], **spec[1])
    if command.table:
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(_function=function)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser: every verb listed, and the flags of ``verb`` (only its module is imported)."""
    parser = argparse.ArgumentParser(
        prog="qlora-guide",
        description="Quantize, fine-tune with QLoRA, evaluate and deploy language models.",
        epilog="Each command has its own --help. Docs: https://qlora-guide.readthedocs.io",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.summary, description=command.summary)
        if name == verb:
            add_arguments(p, command)
    return parser


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def emit(result: Any, as_json: bool, table: Callable[[Any], str]) -> None:
    """Print a result as a table, or as JSON for scripts."""
    if as_json:
        print_json(result.to_dict() if hasattr(result, "to_dict") else result)
    else:
        print(table(result))


def run(args: argparse.Namespace) -> int:
    """Call the command's function with the parsed arguments, print what it returns, and return its exit status
    (a result's ``exit_code``, else 0)."""
    command = COMMANDS[args.command]
    kwargs = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "json")}
    for name in command.stdin:
        if kwargs.get(name) == "-":
            kwargs[name] = sys.stdin.read()
    result = args._function(**kwargs)
    if command.table:
        emit(result, args.json, resolve(command.table))
    return getattr(result, "exit_code", 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qlora-guide`` script: one-line errors, exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(verb if verb in COMMANDS else None).parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with progress.quiet(getattr(args, "json", False)):  # JSON on stdout is for scripts: no bars on stderr either
            return run(args)
    except QLoRAGuideError as err:
        print(f"qlora-guide {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"qlora-guide {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop writing, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
