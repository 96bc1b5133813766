"""Tables and plots of benchmark results, made from the results JSONL alone.

Table 1 of the paper: personalized evaluation in the dual and all scenarios. Table 3: generalization
(trained in the single scenario, every client tested on every task). FedRouter's routing mode is fixed in
advance, not picked on the test results: local routing for personalized evaluation, global routing for
generalization (the paper's two modes).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedrouter.errors import ConfigError

# The methods every table of the protocol lists, run or not ("–"); any other registered method is listed where
# the records hold it (a method added later gets rows in the tables of the results that include it).
PROTOCOL_METHODS = ("zeroshot", "fedrouter", "oracle", "local", "fedit", "feddpa", "fedsa")
_ROW_KINDS = ("reference", "baseline", "router", "upper bound")  # the order of a table's rows


def _methods(records: list[dict]) -> list:
    """The method classes the tables of ``records`` list, in the registry's order."""
    from fedrouter.methods import methods

    known = methods()
    present = {r["method"] for r in records}
    unknown = sorted(present - set(known))
    if unknown:
        raise ConfigError(
            f"results hold records of methods {unknown}, which are not registered here: load their plugins "
            "(FEDROUTER_PLUGINS) to make their tables"
        )
    return [m for name, m in known.items() if name in PROTOCOL_METHODS or name in present]


def rows(records: list[dict]) -> list[tuple[str, str | None, str]]:
    """(method, routing, label) of every table row: reference, baselines, FedRouter, upper bound."""
    ranked = sorted(_methods(records), key=lambda m: _ROW_KINDS.index(m.kind))
    return [(m.name, routing, label) for m in ranked for routing, label in m.table_rows()]


def baselines(records: list[dict]) -> tuple[str, ...]:
    return tuple(m.name for m in _methods(records) if m.kind == "baseline")


def _gains(records: list[dict]) -> list[tuple[tuple[str, ...], str]]:
    """The baselines FedRouter's gains are measured against: all of them, and the client-personalized ones."""
    personal = [m for m in _methods(records) if m.client_personalized]
    names = ", ".join(m.title for m in personal)
    return [
        (baselines(records), "vs best baseline"),
        (tuple(m.name for m in personal), f"vs best client-personalized baseline ({names})"),
    ]


FEDROUTER_MODE = {"personalized": "local", "generalization": "global"}


def _cell(values: list[float]) -> str:
    """mean ± spread (half the range over seeds), or the single value."""
    if not values:
        return "–"
    mean = float(np.mean(values))
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {(max(values) - min(values)) / 2:.1f}"


def _seeds_label(seeds) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))}"


def _rouge1_cell(chosen: list[dict], scenario_seeds: set[int]) -> str:
    """``_cell`` of ROUGE-1, naming the seeds when this cell has fewer than its scenario (a benchmark still running)."""
    cell = _cell([r["rouge1"] for r in chosen])
    seeds = {r["seed"] for r in chosen}
    return cell if not chosen or seeds == scenario_seeds else f"{cell} ({_seeds_label(seeds)})"


def _scenario_seeds(records: list[dict], scenario: str) -> set[int]:
    return {r["seed"] for r in records if r["scenario"] == scenario}


def _select(records: list[dict], method: str, routing: str | None, scenario: str, eval_mode: str) -> list[dict]:
    return [
        r
        for r in records
        if r["method"] == method
        and r["scenario"] == scenario
        and r["eval_mode"] == eval_mode
        and (routing is None or r.get("routing") == routing)
    ]


def _mean(records: list[dict], key: str = "rouge1") -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def gain(records: list[dict], scenario: str, eval_mode: str, among: tuple[str, ...] | None = None) -> dict | None:
    """FedRouter (its predeclared routing mode) against the best of ``among``: absolute and relative ROUGE-1 gain.

    Compared on the seeds FedRouter and every baseline that has run share: a mean over seeds 0 and 1 against
    another over seed 0 alone would mix seed noise into the gain. Baselines without a run are named as missing.
    """
    among = baselines(records) if among is None else among
    ours = _select(records, "fedrouter", FEDROUTER_MODE[eval_mode], scenario, eval_mode)
    others = {m: _select(records, m, None, scenario, eval_mode) for m in among}
    others = {m: chosen for m, chosen in others.items() if chosen}
    if not ours or not others:
        return None
    seeds = set.intersection({r["seed"] for r in ours}, *({r["seed"] for r in chosen} for chosen in others.values()))
    if not seeds:
        return None
    ours_mean = _mean([r for r in ours if r["seed"] in seeds])
    means = {m: _mean([r for r in chosen if r["seed"] in seeds]) for m, chosen in others.items()}
    best = max(means, key=means.get)
    return {
        "missing": [m for m in among if m not in others],
        "seeds": sorted(seeds),
        "partial": seeds != _scenario_seeds(records, scenario),
        "fedrouter": ours_mean,
        "best_baseline": best,
        "baseline": means[best],
        "absolute": ours_mean - means[best],
        "relative": (ours_mean - means[best]) / means[best] if means[best] else None,
    }


def _gain_line(g: dict | None) -> str:
    if g is None:
        return "–"
    if g["relative"] is None:  # a baseline scoring 0 (seen with tiny test models): no relative gain exists
        line = f"{g['absolute']:+.1f} (vs {g['best_baseline']}, which scores 0: no relative gain)"
    else:
        line = f"{g['absolute']:+.1f} ({100 * g['relative']:+.1f}% vs {g['best_baseline']})"
    if g["partial"]:
        line += f", on {_seeds_label(g['seeds'])} (the seeds all have)"
    return line + (f", {', '.join(g['missing'])} not run yet" if g["missing"] else "")


def table1(records: list[dict]) -> str:
    scenarios = [s for s in ("dual", "all", "flan16-dual") if any(r["scenario"] == s for r in records)]
    if not scenarios:
        return "No dual, all or flan16-dual results yet."
    lines = [
        "| method | " + " | ".join(scenarios) + " |",
        "|---|" + "---|" * len(scenarios),
    ]
    for method, routing, label in rows(records):
        cells = []
        for scenario in scenarios:
            chosen = _select(records, method, routing, scenario, "personalized")
            cells.append(_rouge1_cell(chosen, _scenario_seeds(records, scenario)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for among, label in _gains(records):
        gains = [_gain_line(gain(records, s, "personalized", among)) for s in scenarios]
        lines.append(f"| FedRouter (local routing) {label} | " + " | ".join(gains) + " |")
    return "\n".join(lines)


def _per_task(records: list[dict], scenario: str, eval_mode: str) -> tuple[list[str], list[str]]:
    """The tasks, and a table of them: header and one row per method, ROUGE-1 per task and the average."""
    chosen_records = [r for r in records if r["scenario"] == scenario and r["eval_mode"] == eval_mode]
    tasks = sorted({t for r in chosen_records for t in r["rouge1_per_task"]})
    lines = ["| method | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
    for method, routing, label in rows(records):
        chosen = _select(chosen_records, method, routing, scenario, eval_mode)
        cells = [_cell([r["rouge1_per_task"][t] for r in chosen if t in r["rouge1_per_task"]]) for t in tasks]
        average = _rouge1_cell(chosen, _scenario_seeds(records, scenario))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {average} |")
    return tasks, lines


def table1_by_task(records: list[dict]) -> str:
    """Table 1 split by task, one table per scenario: where a method's average comes from."""
    parts = []
    for scenario in ("dual", "all", "flan16-dual"):
        if any(r["scenario"] == scenario for r in records):
            parts += [f"**{scenario}**", "", *_per_task(records, scenario, "personalized")[1], ""]
    return "\n".join(parts).rstrip() or "No dual, all or flan16-dual results yet."


def table3(records: list[dict]) -> str:
    if not any(r["scenario"] == "single" and r["eval_mode"] == "generalization" for r in records):
        return "No single-scenario (generalization) results yet."
    tasks, lines = _per_task(records, "single", "generalization")
    for among, label in _gains(records):
        lines.append(
            f"| FedRouter (global routing) {label} | "
            + " | ".join("" for _ in tasks)
            + f" | {_gain_line(gain(records, 'single', 'generalization', among))} |"
        )
    return "\n".join(lines)


def clustering_table(records: list[dict]) -> str:
    lines = [
        "| scenario | local clustering acc. | global clustering acc. | routing acc. (personalized, local) "
        "| routing acc. (generalization, global) | global clusters |",
        "|---|---|---|---|---|---|",
    ]
    for scenario in ("single", "dual", "all", "flan16-dual"):
        ours = [r for r in records if r["method"] == "fedrouter" and r["scenario"] == scenario]
        if not ours:
            continue
        pers = _select(ours, "fedrouter", "local", scenario, "personalized")
        gen = _select(ours, "fedrouter", "global", scenario, "generalization")
        by_seed = {r["seed"]: r for r in ours}
        lines.append(
            f"| {scenario} | {_cell([100 * r['cluster_acc_local'] for r in by_seed.values()])} "
            f"| {_cell([100 * r['cluster_acc_global'] for r in by_seed.values()])} "
            f"| {_cell([100 * r['routing_acc'] for r in pers if r['routing_acc'] is not None])} "
            f"| {_cell([100 * r['routing_acc'] for r in gen if r['routing_acc'] is not None])} "
            f"| {', '.join(str(r['global_k']) for r in by_seed.values())} |"
        )
    return "\n".join(lines)


def _setting(scenario: str) -> str:
    """The benchmark setting a scenario belongs to: paper4 (8 clients) or the many-task flan16 run (16 clients)."""
    return scenario if scenario == "flan16-dual" else "paper4"


def cost_table(records: list[dict], notes: list[dict] | None = None) -> str:
    """Time, bytes and memory per method, per setting when both paper4 and the many-task run are present (16
    clients cost more than 8), and per machine when runs come from more than one (wall times of different CPUs
    do not average). Runs named in ``notes`` (timed while other work shared the machine) are left out of the
    time column and listed below it."""
    noted = {(n["scenario"], n["seed"], n["method"]): n["note"] for n in notes or []}
    settings = sorted({_setting(r["scenario"]) for r in records}, key=("paper4", "flan16-dual").index)
    machines = sorted({r.get("machine", "") for r in records})
    by_setting, by_machine = len(settings) > 1, len(machines) > 1
    extra = ["setting"] * by_setting + ["machine"] * by_machine
    header = ["method", *extra, "wall s (mean)", "runs timed", "MB up per round", "peak memory GiB"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for method in (m.name for m in _methods(records)):
        for setting in settings:
            for where in machines:
                chosen = {
                    (r["scenario"], r["seed"]): r
                    for r in records
                    if r["method"] == method and _setting(r["scenario"]) == setting and r.get("machine", "") == where
                }
                if not chosen:
                    continue
                timed = [r["wall_s"] for (scenario, seed), r in chosen.items() if (scenario, seed, method) not in noted]
                wall = f"{np.mean(timed):.0f}" if timed else "n/a"
                # no rounds (zero-shot): nothing sent per round
                up = np.mean([np.mean(r["bytes_up_per_round"] or [0]) for r in chosen.values()]) / 1e6
                peak = max(r["peak_rss_mb"] for r in chosen.values()) / 1024
                where_cells = [setting] * by_setting + [where] * by_machine
                cells = [method, *where_cells, wall, str(len(timed)), f"{up:.2f}", f"{peak:.1f}"]
                lines.append("| " + " | ".join(cells) + " |")
    if noted:
        lines += ["", "Left out of the time column (their wall_s is in the JSONL):"]
        lines += [f"- {method}, {scenario}, seed {seed}: {note}" for (scenario, seed, method), note in noted.items()]
    return "\n".join(lines)


RETIRED_NOTE = (
    "**v1, retired.** These results stay as they were made. Their protocol let the decoding budget read each test "
    "sample's true task (qqp: 4 tokens), its prompts named the task, and the records mix commits, CPUs and "
    "precisions. The standard benchmark is now `paper4-raw-cpu` (v2): the authors' bare inputs, one budget for "
    "every sample, fp32, one commit."
)


def markdown(records: list[dict], command: str, notes: list[dict] | None = None, name: str = "paper4-raw-cpu") -> str:
    seeds = sorted({r["seed"] for r in records})
    profiles = sorted({r["profile"] for r in records})
    machines = sorted({r["machine"] for r in records})
    commits = sorted({r["commit"] for r in records})
    variants = sorted({json.dumps(r["overrides"], sort_keys=True) for r in records if r.get("overrides")})
    parts = [
        f"# {name} results",
        "",
        *([RETIRED_NOTE, ""] if "full" in profiles else []),
        f"Regenerate: `{command}`. Profile {', '.join(profiles)}; seeds {seeds}; ROUGE-1 mean ± half the range over "
        f"seeds. Machine: {'; '.join(machines)}. Commits: {', '.join(commits)}.",
        "",
        *(
            [f"**A variant of the protocol**: settings changed from `{name}`: {'; '.join(variants)}.", ""]
            if variants
            else []
        ),
        "## Table 1: personalized evaluation (ROUGE-1)",
        "",
        table1(records),
        "",
        "## Table 1 by task (personalized ROUGE-1 per task; the average is the mean over tasks)",
        "",
        table1_by_task(records),
        "",
        "## Table 3: generalization, trained in the single scenario (ROUGE-1 per task)",
        "",
        table3(records),
        "",
        "## Clustering and routing (FedRouter, %)",
        "",
        clustering_table(records),
        "",
        "## Cost",
        "",
        cost_table(records, notes),
        "",
    ]
    return "\n".join(parts)


# --- plots -----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scenario_panels(records: list[dict]):
    """One panel per scenario present in the records: (pyplot, figure, [(axis, scenario)])."""
    plt = _pyplot()
    scenarios = [s for s in ("single", "dual", "all", "flan16-dual") if any(r["scenario"] == s for r in records)]
    width = max(len(scenarios), 1)
    fig, axes = plt.subplots(1, width, figsize=(4 * width, 3.2), squeeze=False)
    return plt, fig, list(zip(axes[0], scenarios, strict=False))


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_silhouette(records: list[dict], path: Path) -> None:
    fedrouter = [r for r in records if r["method"] == "fedrouter"]  # a scenario FedRouter has not run yet: no panel
    plt, fig, panels = _scenario_panels(fedrouter)
    for ax, scenario in panels:
        run = next(r for r in fedrouter if r["scenario"] == scenario)
        for i, (_client, scores) in enumerate(sorted(run["silhouette_local"].items())):
            ks = sorted(int(k) for k in scores)
            ax.plot(
                ks,
                [scores[str(k)] for k in ks],
                color="tab:blue",
                alpha=0.35,
                label="local (per client)" if not i else None,
            )
        glob = run["silhouette_global"]
        ks = sorted(int(k) for k in glob)
        ax.plot(ks, [glob[str(k)] for k in ks], color="tab:red", marker="o", label="global")
        ax.set(title=f"{scenario} (seed {run['seed']})", xlabel="k", ylabel="silhouette score")
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_rouge_per_round(records: list[dict], path: Path) -> None:
    plt, fig, panels = _scenario_panels(records)
    for ax, scenario in panels:
        for method, routing, label in rows(records):
            chosen = _select(records, method, routing, scenario, "personalized")
            curves = [
                r["rouge1_per_round"] for r in chosen if r["rouge1_per_round"] and None not in r["rouge1_per_round"]
            ]
            if curves:
                mean = np.mean(np.array(curves, dtype=float), axis=0)
                ax.plot(range(1, len(mean) + 1), mean, marker="o", label=label)
        rounds = max((len(r["rouge1_per_round"]) for r in records if r["scenario"] == scenario), default=1)
        ax.set(title=f"{scenario}: personalized check set", xlabel="round", ylabel="ROUGE-1")
        ax.set_xticks(range(1, rounds + 1))
        ax.legend(fontsize=6)
    _save(plt, fig, path)


def plot_clustering_accuracy(records: list[dict], path: Path) -> None:
    plt = _pyplot()
    scenarios = [
        s
        for s in ("single", "dual", "all", "flan16-dual")
        if any(r["scenario"] == s and r["method"] == "fedrouter" for r in records)
    ]
    local, glob = [], []
    for scenario in scenarios:
        runs = {r["seed"]: r for r in records if r["method"] == "fedrouter" and r["scenario"] == scenario}.values()
        local.append(100 * np.mean([r["cluster_acc_local"] for r in runs]))
        glob.append(100 * np.mean([r["cluster_acc_global"] for r in runs]))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = np.arange(len(scenarios))
    ax.bar(x - 0.2, local, 0.4, label="local")
    ax.bar(x + 0.2, glob, 0.4, label="global")
    ax.set_xticks(x, scenarios)
    ax.set(ylabel="clustering accuracy (%)", ylim=(0, 105), title="FedRouter clustering accuracy")
    ax.legend()
    _save(plt, fig, path)


def plot_tsne(points: dict, path: Path) -> None:
    """Two panels of the same 2-D embedding: coloured by true task and by global cluster."""
    plt = _pyplot()
    xy = np.asarray(points["xy"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key, title in ((axes[0], "tasks", "true task"), (axes[1], "clusters", "global cluster")):
        labels = points[key]
        for value in sorted(set(labels), key=str):
            mask = np.array([v == value for v in labels])
            ax.scatter(xy[mask, 0], xy[mask, 1], s=6, label=str(value))
        ax.set(title=f"t-SNE of sample embeddings, by {title}", xticks=[], yticks=[])
        ax.legend(fontsize=7, markerscale=2)
    _save(plt, fig, path)


def write_report(
    records: list[dict], out: Path, stem: str, command: str, tsne: dict | None = None, notes: list[dict] | None = None
) -> list[Path]:
    """Markdown tables and PNG plots next to the results; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{stem}.md"]
    written[0].write_text(markdown(records, command, notes, stem))
    plots = out / f"{stem}-plots"
    plots.mkdir(exist_ok=True)
    if any(r["method"] == "fedrouter" for r in records):
        plot_silhouette(records, plots / "silhouette.png")
        plot_clustering_accuracy(records, plots / "clustering_accuracy.png")
        written += [plots / "silhouette.png", plots / "clustering_accuracy.png"]
    if any(None not in r["rouge1_per_round"] for r in records if r["rouge1_per_round"]):  # a per-round check ran
        plot_rouge_per_round(records, plots / "rouge1_per_round.png")
        written.append(plots / "rouge1_per_round.png")
    if tsne:
        plot_tsne(tsne, plots / "tsne.png")
        written.append(plots / "tsne.png")
    return written


def group_counts(records: list[dict]) -> dict:
    """How many records each (method, scenario, eval_mode) has: a quick completeness check."""
    counts: dict = defaultdict(int)
    for r in records:
        counts[(r["method"], r.get("routing"), r["scenario"], r["eval_mode"])] += 1
    return dict(counts)
