"""The sweep report: table, csv and plot from metrics.json files, and clear errors for broken sweeps."""

import csv
import json

import pytest
from matplotlib.axes import Axes

from lightning_prune.report import CSV_FILE, PLOT_FILE, ReportError, load_sweep, main, markdown_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(sweep_dir, name, sparsity, pruner="saliency", extra_overrides=(), **changes):
    """A metrics.json as the app writes it, in SWEEP_DIR/NAME/, with the sweep's overrides."""
    metrics = {
        "sparsity_level": sparsity,
        "pruner": pruner,
        "params_before": 24000,
        "params_after": round(24000 * (1 - sparsity) ** 2),
        "macs_before": 150_000_000,
        "macs_after": round(150_000_000 * (1 - sparsity) ** 2),
        "latency_ms_before": 10.0,
        "latency_ms_after": 10.0 * (1 - sparsity),
        "val_acc": 0.98 - sparsity / 10,
        "test_acc": 0.97 - sparsity / 10,
        "dense_test_acc": 0.975,
        "overrides": [
            f"pruner={pruner}",
            f"pruner.sparsity_level={sparsity}",
            "trainer.max_epochs=3",
            *extra_overrides,
        ],
    }
    metrics.update(changes)
    run_dir = sweep_dir / name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir / "metrics.json"


def table_rows(table):
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[2:]]


def test_table_is_sorted_by_sparsity_and_shows_only_varied_overrides(tmp_path):
    write_run(tmp_path, "0", 0.75, "fpgm", ["model=digits_cnn"])
    write_run(tmp_path, "1", 0.25, "saliency", ["model=digits_resnet"])
    write_run(tmp_path, "2", 0.5, "saliency", ["model=digits_cnn"])
    table = markdown_table(load_sweep(tmp_path))
    header = table.splitlines()[0]
    assert "model" in header and "trainer.max_epochs" not in header
    rows = table_rows(table)
    assert [row[:3] for row in rows] == [
        ["digits_resnet", "0.25", "saliency"],
        ["digits_cnn", "0.5", "saliency"],
        ["digits_cnn", "0.75", "fpgm"],
    ]
    assert rows[0][3] == "24,000 → 13,500 (56%)"
    assert rows[0][5] == "10.000 → 7.500 (75%)"
    assert rows[0][7] == "0.9450 (dense 0.9750)"


def test_pruner_and_sparsity_overrides_are_not_repeated_as_columns(tmp_path):
    write_run(tmp_path, "0", 0.25, "fpgm")
    write_run(tmp_path, "1", 0.5, "saliency")
    header = markdown_table(load_sweep(tmp_path)).splitlines()[0]
    assert [cell.strip() for cell in header.strip("|").split("|")][:2] == ["sparsity", "pruner"]


def test_main_writes_csv_and_png_and_prints_the_table(tmp_path, capsys):
    for index, sparsity in enumerate((0.5, 0.25)):
        for pruner in ("saliency", "fpgm"):
            write_run(tmp_path, f"{pruner}{index}", sparsity, pruner)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert len(table_rows(out.strip())) == 4
    with (tmp_path / CSV_FILE).open() as file:
        records = list(csv.DictReader(file))
    assert [(r["sparsity_level"], r["pruner"]) for r in records] == [
        ("0.25", "fpgm"),
        ("0.25", "saliency"),
        ("0.5", "fpgm"),
        ("0.5", "saliency"),
    ]
    assert float(records[0]["latency_ms_after"]) == pytest.approx(7.5)
    assert (tmp_path / PLOT_FILE).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "holds a list"),
        (json.dumps({"sparsity_level": 0.5}), "lacks params_before"),
    ],
)
def test_broken_run_is_skipped_by_path_and_good_runs_are_still_reported(tmp_path, capsys, content, reason):
    write_run(tmp_path, "0", 0.5)
    broken = tmp_path / "1" / "metrics.json"
    broken.parent.mkdir()
    broken.write_text(content)
    assert main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"skipped {broken}" in captured.err and reason in captured.err
    assert len(table_rows(captured.out.strip())) == 1


def test_non_numeric_metric_is_a_broken_run(tmp_path):
    write_run(tmp_path, "0", 0.5)
    bad = write_run(tmp_path, "1", 0.25, val_acc="high")
    sweep = load_sweep(tmp_path)
    assert len(sweep.runs) == 1
    assert sweep.skipped == [(bad, f"{bad} has non-numeric val_acc")]


def test_only_broken_runs_fail_with_every_path_named(tmp_path, capsys):
    broken = tmp_path / "0" / "metrics.json"
    broken.parent.mkdir()
    broken.write_text("")
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"no readable metrics.json under {tmp_path}" in err and str(broken) in err
    assert not (tmp_path / CSV_FILE).exists()


def test_missing_and_empty_dirs_are_errors_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(ReportError, match=f"sweep dir {missing} does not exist"):
        load_sweep(missing)
    with pytest.raises(ReportError, match=f"no metrics.json found under {tmp_path}"):
        load_sweep(tmp_path)
    assert main([str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err


def test_runs_without_test_accuracy_are_still_tabled_and_plotted(tmp_path):
    write_run(tmp_path, "0", 0.5, test_acc=None, dense_test_acc=None)
    write_run(tmp_path, "1", 0.25)
    assert main([str(tmp_path)]) == 0
    rows = table_rows(markdown_table(load_sweep(tmp_path)))
    assert rows[1][6] == ""
    assert (tmp_path / PLOT_FILE).read_bytes().startswith(PNG_MAGIC)


def test_a_budget_sweep_plots_against_the_cost_removed(tmp_path, monkeypatch):
    for k, budget in enumerate((0.5, 0.25)):
        write_run(tmp_path, f"run{k}", 1 - budget, pruner="taylor", extra_overrides=[f"+target.macs={budget}"],
                  target={"macs": budget})
    assert load_sweep(tmp_path).varied_keys == []  # the budget is the x axis, not a column of its own
    labels = []
    monkeypatch.setattr(Axes, "set", lambda self, **kwargs: labels.append(kwargs.get("xlabel")))
    assert main([str(tmp_path)]) == 0
    assert labels == ["fraction of dense macs removed (1 - target)"] * 2
