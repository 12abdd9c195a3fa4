"""The command line (qlora_guide.cli): every bad input is one line on stderr, exit status 2, and nothing on disk changes.

Each case runs through ``cli.main`` in this process, in a folder that holds
the inputs, with the model cache pointed at a folder that must still not
exist afterwards: the error came before any model was loaded or converted.
"""

from __future__ import annotations

import pytest
from test_outputs import snapshot

from qlora_guide import cli

RECIPES = {
    "badlr.yaml": "name: x\ntraining:\n  learning_rate: abc\n",
    "r0.yaml": "name: x\nlora:\n  r: 0\n",
    "steps.yaml": "name: x\ntraining:\n  max_steps: 2.5\n",
    "dropout.yaml": "name: x\nlora:\n  lora_dropout: 1.5\n",
    "broken.yaml": "name: [x\n",
    "nodata.yaml": "name: x\ndata:\n  path: /nonexistent.jsonl\n",
    "nf5.yaml": "name: x\nquantization:\n  bnb_4bit_quant_type: nf5\n",
    "float8.yaml": "name: x\nmodel:\n  dtype: float8\n",
    "warmup.yaml": "name: x\ntraining:\n  warmup_ratio: 2\n",
    "bf16.yaml": "name: x\ntraining:\n  bf16: maybe\n",
    "list.yaml": "[1, 2]\n",
    "empty.yaml": "",
}
DATA = {
    "badline.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "user"\n',
    "empty.jsonl": "",
    "nofmt.jsonl": '{"foo": 1}\n{"foo": 2}\n',
    "notes.txt": "a file that is not a folder\n",
}

CASES = [
    (["train", "badlr.yaml"], "training.learning_rate: expected a number, got 'abc'"),
    (["train", "r0.yaml"], "lora.r: must be a positive integer, not 0"),
    (["train", "steps.yaml"], "training.max_steps: expected an integer, got 2.5"),
    (["train", "dropout.yaml"], "lora.lora_dropout: must be in [0, 1), not 1.5"),
    (["train", "broken.yaml"], "is not valid YAML"),
    (["train", "nodata.yaml"], "data file /nonexistent.jsonl does not exist"),
    (["train", "nf5.yaml"], "quantization.bnb_4bit_quant_type: must be nf4 or fp4, not 'nf5'"),
    (["train", "float8.yaml"], "model.dtype: must be one of float32, bfloat16, float16, not 'float8'"),
    (["train", "warmup.yaml"], "training.warmup_ratio: must be in [0, 1)"),
    (["train", "bf16.yaml"], "training.bf16: must be true, false or auto"),
    (["train", "list.yaml"], "must be a mapping of sections, not list"),
    (["train", "empty.yaml"], "empty"),
    (["train", "nosuchrecipe"], "no recipe 'nosuchrecipe'"),
    (["train", "demo", "--set", "training.nosuchkey=1"], "unknown recipe key 'training.nosuchkey'"),
    (["train", "demo", "--set", "nosection.x=1"], "unknown recipe key 'nosection'"),
    (["train", "demo", "--set", "training.learning_rate"], "must look like section.key=value"),
    (["train", "demo", "--set", "training.learning_rate=.inf"], "must be a positive finite number, not inf"),
    (["train", "demo", "--set", "training.lr_scheduler_type=bogus"], "training.lr_scheduler_type: must be one of linear, cosine, "),
    (["train", "demo", "--set", "training.report_to=[nosuchlogger]"], "training.report_to"),
    (["train", "demo", "--set", "training.optim=paged_adamw_32bit"], "needs a CUDA GPU"),
    (["train", "demo", "--set", "data.path=badline.jsonl"], "line 2 is not valid JSON"),
    (["train", "demo", "--set", "data.path=empty.jsonl"], "holds no examples"),
    (["train", "demo", "--set", "data.path=nofmt.jsonl"], "cannot tell the format"),
    (["train", "demo", "--set", "data.format=xml"], "data.format: must be one of"),
    (["train", "demo", "--set", "data.languages=[de]"], "no training example with data.languages=['de']"),
    (["train", "demo", "--output-dir", "notes.txt"], "notes.txt"),
    (["train", "demo", "--resume", "--overwrite"], "choose one of --resume and --overwrite"),
    (["train", "demo", "--resume", "--output-dir", "no-run"], "holds no run to resume"),
    (["evaluate", "smollm2-135m", "--max-samples", "0"], "max_samples must be positive, not 0"),
    (["evaluate", "smollm2-135m", "--batch-size", "0"], "batch_size must be a positive integer, not 0"),
    (["evaluate", "smollm2-135m", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer, not 0"),
    (["evaluate", "smollm2-135m", "--split", "nosuch"], "has no 'nosuch' split (it has: test, train, validation)"),
    (["evaluate", "smollm2-135m", "--data", "nosuch.jsonl"], "data file nosuch.jsonl does not exist"),
    (["evaluate", "smollm2-135m", "--output-dir", "notes.txt"], "is a file, not a folder"),
    (["merge", ".", "--output-dir", "merged"], "it is not a peft adapter folder"),
    (["merge", "nonexistent", "--output-dir", "merged"], "does not exist"),
    (["quantize", "smollm2-135m", "--output-dir", "notes.txt"], "is a file, not a folder"),
    (["estimate", "smollm2-135m", "--batch-size", "0"], "batch_size must be a positive integer, not 0"),
    (["estimate", "smollm2-135m", "--seq-len", "-1"], "seq_len must be a positive integer, not -1"),
    (["estimate", "smollm2-135m", "--r", "0"], "must be a positive integer, not 0"),
    (["generate", ""], "the prompt is empty"),
    (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be a positive number of tokens, not 0"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be 0 (greedy) or positive, not -1.0"),
    (["generate", "hi", "--top-p", "1.5"], "top_p must be in (0, 1], not 1.5"),
    (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1], not 0.0"),
    (["serve", "--port", "70000"], "port 70000 is not a TCP port"),
    (["serve", "--context-length", "-5"], "context_length must be a positive number of tokens, not -5"),
    (["serve", "--max-tokens-limit", "0"], "must be positive"),
    (["serve", "smollm2-135m", "smollm2-135m"], "smollm2-135m is not an adapter folder"),
    (["serve", "--max-batch", "0"], "must be positive"),
    (["info", "nonexistent"], "does not exist"),
    (["info", "."], "is neither a model folder (config.json) nor an adapter folder"),
    (["recipes", "--show", "nosuch"], "no recipe 'nosuch'"),
    (["recipes", "--copy", "demo", "notes.txt"], "notes.txt is a file, not a folder"),
    (["recipes", "--copy", "nosuch", "x.yaml"], "no bundled recipe 'nosuch'"),
]


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A working folder with the bad inputs, and a model cache that must stay absent."""
    for name, text in {**RECIPES, **DATA}.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QLORA_GUIDE_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    return tmp_path


@pytest.mark.parametrize(("argv", "message"), CASES + [(["train", "demo", "--set", "data.path=latin1.jsonl"], "UTF-8")],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(inputs, capsys, argv, message):
    before = snapshot(inputs)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qlora-guide {argv[0]}: error: ") and "\n" not in err, err
    assert message in err, err
    assert snapshot(inputs) == before, "a refused command changed files"
    assert not (inputs.parent / f"{inputs.name}-cache").exists(), "a model was loaded before the input was checked"


@pytest.mark.parametrize("verb", list(cli.COMMANDS))
def test_every_flag_is_a_parameter_of_the_commands_function(verb, capsys):
    """`--help` of every verb is built from its function's signature: each parameter a flag of the same name."""
    import inspect

    with pytest.raises(SystemExit) as done:
        cli.main([verb, "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    command = cli.COMMANDS[verb]
    function = cli.resolve(command.function)
    positional = command.positional
    for name, param in inspect.signature(function).parameters.items():
        if name in command.hidden:
            continue
        if positional is None and param.default is inspect.Parameter.empty or positional and name in positional:
            assert command.flags.get(name, name).upper() in shown, (verb, name)
        else:
            flag = "--" + command.flags.get(name, name).replace("_", "-")
            assert flag in shown, (verb, name, flag)


def test_the_top_level_help_lists_every_verb_without_importing_torch():
    import subprocess
    import sys

    probe = ("import sys\nfrom qlora_guide import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip().endswith("False"), done.stdout[-500:] + done.stderr[-500:]
    for verb in cli.COMMANDS:
        assert verb in done.stdout


def test_commands_run_through_main_and_print_tables_or_json(inputs, capsys):
    """The quick verbs, end to end through cli.main: a table by default, the same result with --json."""
    import json

    assert cli.main(["estimate", "mistral-7b", "--batch-size", "2", "--r", "16", "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert estimate["settings"]["batch_size"] == 2 and estimate["settings"]["r"] == 16
    assert cli.main(["estimate", "mistral-7b", "--batch-size", "2", "--r", "16"]) == 0
    assert "GiB" in capsys.readouterr().out
    assert cli.main(["recipes", "--json"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)["recipes"]]
    assert "demo" in names
    assert cli.main(["recipes", "--copy", "demo", "mine.yaml"]) == 0
    assert "copied recipe 'demo'" in capsys.readouterr().out and (inputs / "mine.yaml").is_file()
    assert cli.main(["recipes", "--show", "demo"]) == 0
    assert capsys.readouterr().out == (inputs / "mine.yaml").read_text()
