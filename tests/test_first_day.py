"""What a new user meets first: the recipe catalogue, the resolved recipe, the console lines,
the metrics plot, the README's command list."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import yaml

from megatron_dualpipe.cli import build_parser, main
from megatron_dualpipe.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_recipe_has_a_one_line_description(capsys):
    from megatron_dualpipe.catalogue import catalogue

    rows = catalogue()
    assert {name for name, _ in rows} == {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    for name, text in rows:
        assert text and "\n" not in text, name
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(rows)
    for line, (name, text) in zip(out, rows):
        assert line.startswith(f"recipes/{name}") and line.endswith(text)


def test_description_falls_back_to_the_header_comment(tmp_path):
    from megatron_dualpipe.catalogue import describe

    path = tmp_path / "r.yaml"
    path.write_text("# A small test recipe.\n# More words.\nname: r\n")
    assert describe(path) == "A small test recipe."


def test_readme_has_the_recipe_table_and_every_subcommand():
    from megatron_dualpipe.catalogue import catalogue, markdown_table

    readme = (ROOT / "README.md").read_text()
    assert markdown_table(catalogue()) in readme
    commands = build_parser()._subparsers._group_actions[0].choices
    table = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    for name in commands:
        assert re.search(rf"^\| `{name}\b", table, re.M), f"README lacks `{name}`"


def test_readme_test_command_shows_skip_reasons_and_ci_runs_it():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^bash scripts/install.sh --test && python -m pytest.*$", readme, re.M)
    assert command and " -rs" in command.group(0)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command.group(0) in ci


def test_print_config_is_the_resolved_recipe(capsys):
    argv = ["train", "recipes/tiny_moe_cpu_eplb.yaml", "--set", "train.steps=7", "--print-config"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    recipe = load_recipe("recipes/tiny_moe_cpu_eplb.yaml", ["train.steps=7"])
    assert printed == json.loads(recipe.model_dump_json())
    assert printed["train"]["steps"] == 7 and printed["eplb"]["enabled"] is True


def test_written_config_is_a_recipe_that_repeats_the_run(tmp_path):
    from megatron_dualpipe.config.dump import write_resolved

    recipe = load_recipe("recipes/deepseek_v3_671b_ep64_tp1_pp16_h800.yaml", [])
    path = write_resolved(recipe, str(tmp_path / "run"))
    assert path == tmp_path / "run" / "config.yaml"
    assert load_recipe(str(path), []) == recipe


def test_evaluation_schedule():
    from megatron_dualpipe.evaluate import evaluation_due

    recipe = load_recipe("recipes/tiny_moe_cpu.yaml",
                         ["train.steps=25", "train.eval_interval=10", "train.eval_iters=2"])
    assert [s for s in range(1, 26) if evaluation_due(recipe.train, s)] == [10, 20, 25]
    recipe.train.eval_interval = 0
    assert [s for s in range(1, 26) if evaluation_due(recipe.train, s)] == [25]
    recipe.train.eval_iters = 0
    assert not any(evaluation_due(recipe.train, s) for s in range(1, 26))


def _record(step, loss=5.0, tokens_per_s=1000.0, step_time_s=0.5, **extra):
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5,
            "tokens_per_s": tokens_per_s, "step_time_s": step_time_s, **extra}


def test_progress_line_leaves_out_the_warm_up_step(tmp_path, capsys):
    from megatron_dualpipe.metrics import MetricsLogger

    logger = MetricsLogger(str(tmp_path), total_steps=10, enabled=True)
    logger.log(_record(0, tokens_per_s=10.0, step_time_s=50.0))
    logger.log(_record(1, tokens_per_s=1000.0, step_time_s=1.0))
    logger.log(_record(2, tokens_per_s=3000.0, step_time_s=2.0, val_loss=4.25))
    first, second, third = capsys.readouterr().out.splitlines()
    assert "warm-up" in first and "ETA" not in first
    # (1000 * 1 + 3000 * 2) tokens in 3 s; 7 steps left at 1.5 s each
    assert "1,000 tok/s" in second and "ETA 0:08" in second
    assert "2,333 tok/s" in third and "ETA 0:10" in third
    assert "val_loss 4.2500" in third
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[2])["val_loss"] == 4.25


def test_summary_names_first_and_last_losses():
    from megatron_dualpipe.console import summary

    history = [_record(0, loss=6.0), _record(1, loss=5.0, val_loss=5.5),
               _record(2, loss=4.0, val_loss=4.5)]
    text = summary(history, "runs/x/metrics.jsonl")
    assert text == ("done: steps 1-3, loss 6.0000 -> 4.0000, val_loss 5.5000 (step 2) -> "
                    "4.5000 (step 3); metrics: runs/x/metrics.jsonl")


def test_dependency_warnings_known_noise_dropped_others_once_in_a_block(capsys, monkeypatch):
    from megatron_dualpipe import console

    monkeypatch.setenv("RANK", "0")
    with warnings.catch_warnings():
        monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
        console.collect_warnings()
        for _ in range(3):
            warnings.warn("Transformer Engine and Apex are not installed.", UserWarning)
            warnings.warn("something a user should see", UserWarning)
        console.flush_warnings()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[megatron_dualpipe] warnings from dependencies")
    assert len(err) == 2 and "something a user should see" in err[1]


def test_plot_draws_loss_val_loss_throughput_and_balancedness(tmp_path):
    from megatron_dualpipe.plot import _throughput_points

    records = [_record(s, loss=6 - s / 10, eplb_balancedness=0.5 + s / 40,
                       eplb_replanned=int(s == 9), step_time_s=1.0 + s % 2) for s in range(20)]
    records[0]["tokens_per_s"] = 1.0  # warm-up
    for r in records[4::5]:
        r["val_loss"] = r["loss"] + 0.1
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    steps, values, overall = _throughput_points(records)
    assert steps == list(range(2, 21)) and overall == pytest.approx(1000.0)
    out = tmp_path / "m.png"
    assert main(["plot", str(tmp_path), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_directory_without_metrics_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no metrics.jsonl" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_schedule_picture_labels_micro_batches_and_names_every_phase(schedule):
    import matplotlib.pyplot as plt

    from megatron_dualpipe.schedules.draw import timeline_figure
    from megatron_dualpipe.schedules.simulator import simulate_schedule

    result = simulate_schedule(schedule, 4, 8)
    fig = timeline_figure(result)
    legend = " | ".join(t.get_text() for t in fig.legends[0].get_texts())
    for phase in ("F: forward", "B: backward", "W: weight grad", "F&B"):
        assert phase in legend, (phase, legend)
    ax = fig.axes[0]
    cells = [t.get_text() for t in ax.texts]
    parts = sum(len(e.action.parts()) for tl in result.timelines for e in tl)
    assert len(cells) == parts  # every F, B and W cell carries its micro-batch id
    per_direction = 8 // 2 if schedule == "dualpipe" else 8
    assert set(cells) == {str(m) for m in range(per_direction)}
    assert "micro-batch id" in ax.get_xlabel()
    plt.close(fig)
