"""The layout of a run folder: one place names every file, and checkpoints sort by step."""

from __future__ import annotations

from qlora_guide.runs import RunFolder, checkpoint_name, checkpoint_step


def test_run_folder_names_every_file(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.adapter == tmp_path / "run" / "adapter" and run.checkpoints == tmp_path / "run" / "checkpoints"
    assert (run.recipe.name, run.manifest.name, run.metrics.name, run.metrics_log.name) == (
        "recipe.yaml", "manifest.json", "metrics.json", "metrics.jsonl")
    assert run.logs.name == "logs" and run.adapter_staging.name == ".adapter.tmp"
    assert not run.holds_run() and run.checkpoint_dirs() == []
    run.root.mkdir()
    run.recipe.write_text("name: x\n")
    assert run.holds_run()


def test_run_folder_of_an_adapter_is_its_run(tmp_path):
    run = RunFolder(tmp_path)
    run.adapter.mkdir()
    assert RunFolder.of(run.adapter) == RunFolder(run.adapter)  # no manifest or recipe anywhere: the folder itself
    run.manifest.write_text("{}")
    assert RunFolder.of(run.adapter) == run and RunFolder.of(tmp_path) == run


def test_checkpoints_sort_by_step_not_by_name(tmp_path):
    run = RunFolder(tmp_path)
    for step in (100, 9, 20):
        run.checkpoint(step).mkdir(parents=True)
    (run.checkpoints / "checkpoint-last").mkdir()
    (run.checkpoints / "checkpoint-5").write_text("a file, not a checkpoint")
    assert [checkpoint_step(p) for p in run.checkpoint_dirs()] == [9, 20, 100]
    assert checkpoint_name(7) == "checkpoint-7" and checkpoint_step("x/checkpoint-7") == 7
    assert checkpoint_step("checkpoint-") is None and checkpoint_step("adapter") is None
