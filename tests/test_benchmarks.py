"""Keeps benchmarks/run.py alive: its sections run on a tiny MLP and return well-formed rows; no timing is asserted."""

import dataclasses
import math

from benchmarks import models, run, tools

TINY = {"MLP": lambda: models.MLP(width=32, depth=2)}
SETTINGS = dataclasses.replace(run.Settings.quick(), rounds=1, train_batch=2)


def _positive(row: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)


def test_step_section_times_both_pruners_for_ours_and_the_reference():
    rows = run.section_step(["MLP"], SETTINGS, TINY)
    assert [(r["model"], r["pruner"]) for r in rows] == [("MLP", "Saliency"), ("MLP", "FPGM")]
    for row in rows:
        _positive(row, "ours_ms", "reference_ms", "ours_over_reference")


def test_train_section_compares_masked_variants_with_dense():
    rows = run.section_train(["MLP"], SETTINGS, TINY)
    assert [r["variant"] for r in rows] == ["dense", "ours", "ours, prune_bias=False", "reference"]
    for row in rows:
        _positive(row, "ms")
    assert rows[0]["overhead_vs_dense"] == 0


def test_prune_section_records_every_tool():
    rows = run.section_prune(["MLP"], dataclasses.replace(SETTINGS, prune_repeats=1), TINY)
    assert [r["tool"] for r in rows] == list(tools.TOOLS)
    for row in rows:
        assert "error" not in row, row
        _positive(row, "prepare_s", "prune_s", "total_s")
    _positive(rows[0], "over_reference")


def test_exactness_section_holds_for_ours_on_the_mlp():
    rows = run.section_exactness(["MLP"], TINY)
    expected = {(tool, bias) for tool in ("ours", "reference") for bias in (True, False)}
    assert {(r["tool"], r["prune_bias"]) for r in rows} == expected
    for row in rows:
        if row["tool"] == "ours":
            assert row["relative"] <= 1e-5, row


def test_reference_config_leaves_out_the_vgg_conv_it_cannot_fuse():
    model = models.VGG11(width=8)
    ours = {e["tensor_fqn"] for e in tools.prunable_config(model)}
    theirs = {e["tensor_fqn"] for e in tools.reference_config(model)}
    assert ours - theirs == {"features.18.weight"}
    assert not any(fqn.startswith("head") for fqn in ours)


def test_markdown_puts_a_failure_in_the_first_missing_cell():
    rows = [{"model": "m", "tool": "t", "error": "Exception: boom"}, {"model": "m", "tool": "u", "ms": 1.5}]
    table = run.markdown(rows, ["model", "tool", "ms", "speedup"])
    lines = table.splitlines()
    assert lines[2] == "| m | t | fails: Exception: boom |  |"
    assert lines[3] == "| m | u | 1.5 |  |"


def test_errors_fit_a_table_cell_and_keep_the_reason_at_the_end():
    assert run._error(ValueError("short")) == "ValueError: short"
    long = run._error(Exception("Error: " + "x" * 200 + " still contains masks!"))
    assert len(long) < 130 and long.endswith("still contains masks!")


def test_the_study_runs_ours_and_torch_pruning_to_the_same_budget():
    from benchmarks import study

    protocol = study.Protocol(epochs_scale=0.05, ticks=1, steps_per_tick=2, finetune_steps=1)
    rows = study.study([0], (0.5, 0.1), ["Taylor global", "TP Taylor"], protocol, log=lambda line: None,
                       models=("CNN", "ViT"))
    # the ViT cannot reach 0.1 exactly (its LayerNorm'd residual stream stays), so it is not run there
    assert [(r["model"], r["budget"], r["method"]) for r in rows] == [
        (model, budget, method) for model, budgets in (("CNN", (0.5, 0.1)), ("ViT", (0.5,)))
        for budget in budgets for method in ("Taylor global", "TP Taylor")]
    for row in rows:
        assert row["budget"] - 0.1 <= row["macs"] <= row["budget"] and 0 <= row["accuracy"] <= 1, row
    table = study.markdown(rows)
    assert "| Taylor global | " in table and "MACs ≤ 0.5" in table
