"""``ablate``: [STFN]'s ablations (Tables 1-4) and the baselines, each row a cached ``train-head`` output.

A plain command, not a stage: every row runs the train-head stage (so re-running recomputes only what
changed) and the tables, a bar chart and ablate.json go to ``<cache>/ablate/<scope>/`` (the split and
backbone of ``[train-head]``).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from pipeline.eval.results import fmt_mean_std, markdown_table, mean_std
from pipeline.io import artifacts
from pipeline.io.atomic import write_json, write_text
from pipeline.models.heads import HEAD_OPTIONS, applicable_options
from pipeline.models.stfn import ARCHS
from pipeline.stage import StageError, StageLocked, param, params_dict, run_stage
from stages.train_head import STAGE, TrainHeadParams, head_key, head_name

#: Head options of ``[train-head]`` that every row keeps where they apply (the others define the rows).
CARRIED = ("fused_dim", "dropout")

#: grid -> [(file stem, title, [(row label, option overrides)])]; every row starts from STFN (a, avg, bi)
#: at the configured N ([STFN] §4.2: "5 segments, average fusion, and bi-directional fusion as default").
GRIDS: dict[str, list[tuple[str, str, list[tuple[str, dict]]]]] = {
    "tables": [
        ("table1_architecture", "Table 1: STFN architectures (Fig. 4)",
         [(f"arch {a}", {"arch": a}) for a in ARCHS]),
        ("table2_fusion", "Table 2: fusion operations (eq. 4-6, + STCB)",
         [(f"fusion {f}", {"fusion": f}) for f in ("avg", "max", "mul", "stcb")]),
        ("table3_direction", "Table 3: fusion directions (Fig. 5)",
         [(label, {"direction": d}) for label, d in (("A<->M (bi)", "bi"), ("A->M (a2m)", "a2m"),
                                                ("A<-M (m2a)", "m2a"))]),
        ("table4_segments", "Table 4: number of segments",
         [(f"N = {k}", {"segments": k}) for k in (3, 5, 7, 9)]),
        ("baselines", "Baselines and other fusion heads",
         [(h, {"head": h}) for h in ("rgb", "flow", "late", "tsn", "concat", "stcb", "stmultiplier")]
         + [("stfn (a, avg, bi)", {})]),
    ],
    "reduced": [
        ("table1_architecture", "Table 1: STFN architectures (Fig. 4)",
         [("arch a", {"arch": "a"}), ("arch c", {"arch": "c"})]),
        ("table2_fusion", "Table 2: fusion operations (eq. 4-6)",
         [("fusion avg", {"fusion": "avg"}), ("fusion mul", {"fusion": "mul"})]),
        ("table3_direction", "Table 3: fusion directions (Fig. 5)",
         [("A<->M (bi)", {"direction": "bi"}), ("A<-M (m2a)", {"direction": "m2a"})]),
        ("table4_segments", "Table 4: number of segments",
         [(f"N = {k}", {"segments": k}) for k in (3, 5)]),
        ("baselines", "Baselines",
         [(h, {"head": h}) for h in ("rgb", "flow", "tsn")] + [("stfn (a, avg, bi)", {})]),
    ],
}


@dataclass(frozen=True)
class AblateParams:
    grid: str = param("tables", "Which grids: tables ([STFN] Tables 1-4 and every baseline) or reduced "
                      "(two settings per table; for the demo).", choices=tuple(GRIDS))
    seeds: int = param(1, "Train every row with seeds 0..K-1 and report mean ± std.", min=1)


def ablation_rows(base: TrainHeadParams, grid: str, seeds: int) -> list[tuple[str, str, list[tuple[str, list]]]]:
    """[(stem, title, [(label, [TrainHeadParams per seed])])] for ``grid``. Each row starts from ``base``'s
    training settings and STFN at its defaults; of ``base``'s head options only the shared ones
    (:data:`CARRIED`) are kept, and only where they apply to the row's head."""
    out = []
    for stem, title, rows in GRIDS[grid]:
        table = []
        for label, over in rows:
            head = over.get("head", "stfn")
            row = {k: v for k, v in over.items() if k != "head"}
            carried = applicable_options(head, {k: getattr(base, k) for k in CARRIED if k not in row})
            reset = {k: None for k in HEAD_OPTIONS}
            table.append((label, [dataclasses.replace(base, **{**reset, **carried, **row}, head=head, name=None,
                                                      seed=s) for s in range(seeds)]))
        out.append((stem, title, table))
    return out


def ablate_dir(cache_root: Path, base: TrainHeadParams) -> Path:
    """``<cache>/ablate/<scope>/``: the tables of the features of one split and backbone."""
    return Path(cache_root) / artifacts.ABLATE / artifacts.scope(base.split, base.backbone)


def run_ablation(base: TrainHeadParams, cache_root: Path, grid: str = "tables", seeds: int = 1,
                 echo=lambda s: None) -> dict:
    """Train every row of ``grid`` (cached train-head outputs) and write the tables and the chart to
    ``<cache_root>/ablate/``. Returns {stem: [row dicts]}."""
    from pipeline.eval.plots import bar_chart

    cache_root = Path(cache_root)
    tables = ablation_rows(base, grid, seeds)
    done: dict[str, dict] = {}
    total = len({head_name(p) for _, _, rows in tables for _, ps in rows for p in ps})
    for _, _, rows in tables:
        for _, ps in rows:
            for p in ps:
                key = head_key(p)
                if key in done:
                    continue
                try:
                    res = run_stage(STAGE, p, cache_root)
                except StageLocked:
                    raise
                except StageError as e:
                    done[key] = {"skipped": str(e)}
                    echo(f"[{len(done)}/{total}] {key}: skipped: {e}")
                    continue
                r = json.loads((cache_root / key / artifacts.RESULTS).read_text())
                done[key] = {"top1": r["top1"], "mean_class_accuracy": r["mean_class_accuracy"]}
                echo(f"[{len(done)}/{total}] {res.message}")
    out_dir = ablate_dir(cache_root, base)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, list] = {}
    chart, chart_err = {}, {}
    for stem, title, rows in tables:
        body, recs = [], []
        for label, ps in rows:
            keys = [head_key(p) for p in ps]
            res = [done[k] for k in keys]
            skipped = [r["skipped"] for r in res if "skipped" in r]
            rec = {"label": label, "keys": keys, "params": params_dict(ps[0])}
            if skipped:
                rec["skipped"] = skipped[0]
                body.append([label, ps[0].head, "skipped", "skipped", str(len(ps)), skipped[0].replace("|", "/")])
            else:
                top1 = [r["top1"] for r in res]
                mca = [r["mean_class_accuracy"] for r in res]
                rec.update(top1=top1, mean_class_accuracy=mca, top1_mean_std=mean_std(top1),
                           mean_class_accuracy_mean_std=mean_std(mca))
                body.append([label, ps[0].head, fmt_mean_std(top1), fmt_mean_std(mca), str(len(ps)),
                             ", ".join(artifacts.key_parts(k).name for k in keys)])
                bar = artifacts.key_parts(keys[0]).name.rsplit("-s0", 1)[0]
                chart[bar], chart_err[bar] = rec["top1_mean_std"]
            recs.append(rec)
        std_note = f" (mean ± sample std over {seeds} seeds)" if seeds > 1 else ""
        text = (f"# {title}\n\nTest-split accuracy (%){std_note}, one row per setting; every other option as "
                f"`[train-head]` with STFN (a, avg, bi). Grid `{grid}`.\n\n"
                + markdown_table(["setting", "head", "top-1 (%)", "mean class acc. (%)", "seeds", "train-head"],
                                 body, "llrrrl"))
        write_text(out_dir / f"{stem}.md", text)
        report[stem] = recs
    chart_path = out_dir / artifacts.ABLATE_CHART
    if chart:
        bar_chart(chart, chart_path, errors=chart_err if seeds > 1 else None,
                  title=f"ablate ({grid} grid, {seeds} seed{'s' if seeds > 1 else ''}): top-1")
    write_json(out_dir / artifacts.ABLATE_JSON, {"grid": grid, "seeds": seeds, "tables": report})
    return report


@click.command("ablate")
@click.option("--grid", type=click.Choice(list(GRIDS)), default=None,
              help="tables: [STFN] Tables 1-4 and every baseline; reduced: two settings per table. "
                   "[default: tables]")
@click.option("--seeds", type=int, default=None, help="Seeds per row (mean ± std when > 1). [default: 1]")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML config: [ablate] (grid, seeds) and [train-head] (training settings of every row).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")
def ablate_command(grid, seeds, config_path, cache_dir, verbose):
    """[STFN]'s ablations (Tables 1-4) and the baselines on the cached features.

    Every row is a cached train-head output; rows that do not fit the features are reported as skipped.
    Writes the tables, ablate.png and ablate.json to <cache>/ablate/ (docs/train-head.md).

    \b
    Examples:
        pipeline ablate
        pipeline ablate --grid reduced --seeds 3 --config configs/demo.toml
    """
    from pipeline.stage import config as cfg
    from stages.cli import config_tables, resolve_cache_dir, setup_logging

    setup_logging(verbose)
    try:
        conf = cfg.load_config(config_path, config_tables())
        ap = cfg.build_params(AblateParams, conf, "ablate", {"grid": grid, "seeds": seeds}, config_path=config_path)
        base = cfg.build_params(TrainHeadParams, conf, "train-head", {}, config_path=config_path)
        root = resolve_cache_dir(cache_dir, conf)
        report = run_ablation(base, root, ap.grid, ap.seeds, echo=click.echo)
    except (StageError, cfg.ConfigError) as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    skipped = sum("skipped" in r for recs in report.values() for r in recs)
    out = ablate_dir(root, base)
    click.echo(f"ablate: {len(report)} tables in {out}"
               + (f" ({skipped} row(s) skipped, reasons in the tables)" if skipped else ""))
    for stem in report:
        click.echo(f"  {out / (stem + '.md')}")
    click.echo(f"  {out / artifacts.ABLATE_CHART}")
