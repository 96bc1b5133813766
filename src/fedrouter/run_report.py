"""A run report: one HTML page and its PNG charts, made from run folders alone (``fedrouter report``).

Per run: training loss per adapter over rounds (``rounds[].train_loss``), ROUGE-1 per task and routing mode
(``evaluation.by_set[...].per_task``), the clustering's true task x adapter matrix
(``clustering.global_cluster_tasks``: training samples per global cluster, the adapter each one trains), per
routing mode the test samples' true task x the adapter they were routed to (``evaluation.by_set[...].routed``;
runs written before it was recorded have none), the centroids in 2-D (PCA of ``router/``'s global and local
centroids) and time and bytes per phase. Several runs: one table and one chart side by side. The page
links its PNGs relatively and loads nothing from the network: it opens from disk.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from fedrouter.algorithm.naming import adapter_id, cluster_names
from fedrouter.errors import ConfigError
from fedrouter.runlog import METRICS
from fedrouter.serving.artifact import read_names

REPORT_DIR = "report"
PAGE = "index.html"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def load_run(run_dir: Path) -> dict:
    """The run's ``metrics.json``; a ConfigError when the folder has none (not a finished run)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {METRICS} (not a finished run folder)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None


# --- what the charts and tables show, from metrics.json ----------------------------------------------------


def loss_curves(metrics: dict) -> dict[str, list[tuple[int, float]]]:
    """``{adapter: [(round, train loss), ...]}``: the rounds in which each adapter was trained."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in metrics.get("rounds", []):
        for adapter, loss in (record.get("train_loss") or {}).items():
            if loss is not None:
                curves.setdefault(str(adapter), []).append((int(record["round"]), float(loss)))
    return dict(sorted(curves.items(), key=lambda item: _order(item[0])))


def rouge1_by_task(metrics: dict) -> dict[str, dict[str, float]]:
    """``{test set/routing mode: {task: ROUGE-1, ..., "overall": ROUGE-1}}``."""
    table = {}
    for name, result in metrics.get("evaluation", {}).get("by_set", {}).items():
        row = {task: float(v["rouge1"]) for task, v in result.get("per_task", {}).items()}
        row["overall"] = float(result.get("rouge1", float("nan")))
        table[name] = row
    return table


def task_adapter_matrix(metrics: dict) -> tuple[list[str], list[str], np.ndarray] | None:
    """(tasks, adapters, counts[task, adapter]) of the clustering's training samples, or None without labels."""
    clusters = metrics.get("clustering", {}).get("global_cluster_tasks") or {}
    if not clusters:
        return None
    adapters = sorted(clusters, key=_order)
    tasks = sorted({t for mix in clusters.values() for t in mix})
    counts = np.zeros((len(tasks), len(adapters)), dtype=int)
    for j, adapter in enumerate(adapters):
        for task, n in clusters[adapter].items():
            counts[tasks.index(task), j] = int(n)
    return tasks, adapters, counts


def routed_matrices(metrics: dict) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """Per ``<set>/<mode>`` that recorded its routes: (tasks, adapters, test samples[task, adapter]).

    The columns are every global cluster (``clustering.global_k``), so an adapter no sample went to shows as 0.
    """
    global_k = int(metrics.get("clustering", {}).get("global_k") or 0)
    matrices = {}
    for name, result in metrics.get("evaluation", {}).get("by_set", {}).items():
        routed = result.get("routed")
        if not routed:
            continue
        tasks = sorted(routed)
        adapters = sorted({str(g) for g in range(global_k)} | {a for row in routed.values() for a in row}, key=_order)
        counts = np.array([[int(routed[t].get(a, 0)) for a in adapters] for t in tasks], dtype=int)
        matrices[name] = (tasks, adapters, counts)
    return matrices


def phase_times(metrics: dict) -> dict[str, float]:
    """Seconds per phase: clustering, training, evaluation, and the rest of the wall time (start, loading)."""
    phases = metrics.get("phases", {})
    times = {
        "clustering": float(phases.get("clustering_s", 0.0)),
        "training": float(phases.get("training_s", 0.0)),
        "evaluation": float(metrics.get("evaluation_s", 0.0)),
    }
    wall = float(metrics.get("wall_s", 0.0))
    times["other"] = max(wall - sum(times.values()), 0.0)
    return times


def phase_bytes(metrics: dict) -> dict[str, tuple[int, int]]:
    """(bytes up, bytes down) per phase."""
    rounds = metrics.get("rounds", [])
    return {
        "clustering": (int(metrics.get("clustering_bytes_up", 0)), int(metrics.get("clustering_bytes_down", 0))),
        "training": (sum(int(r.get("bytes_up", 0)) for r in rounds), sum(int(r.get("bytes_down", 0)) for r in rounds)),
        "evaluation": (0, int(metrics.get("eval_bytes_down", 0))),
    }


def centroids_2d(run_dir: Path) -> dict | None:
    """PCA to 2-D of the router's global and local centroids: ``{"global": xy, "local": {client: xy}}``, or None."""
    router = Path(run_dir) / "router"
    global_path, local_path = router / "global_centroids.npy", router / "local_centroids.safetensors"
    if not global_path.is_file():
        return None
    glob = np.asarray(np.load(global_path), dtype=np.float64)
    local: dict[str, np.ndarray] = {}
    if local_path.is_file():
        from safetensors.numpy import load_file

        local = {k.removeprefix("client_"): np.asarray(v, dtype=np.float64) for k, v in load_file(local_path).items()}
    points = np.concatenate([glob, *local.values()]) if local else glob
    if points.ndim != 2 or len(points) < 2:
        return None
    centred = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2].T if vt.shape[0] >= 2 else np.pad(vt.T, ((0, 0), (0, 1)))
    xy = centred @ axes
    out = {"global": xy[: len(glob)], "local": {}}
    start = len(glob)
    for client in sorted(local, key=_order):
        out["local"][client] = xy[start : start + len(local[client])]
        start += len(local[client])
    return out


def _order(key: str):
    return (0, int(key)) if str(key).isdigit() else (1, str(key))


# --- charts -------------------------------------------------------------------------------------------------


def plot_loss(curves: dict, path: Path, title: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for adapter, points in curves.items():
        ax.plot([r for r, _ in points], [v for _, v in points], marker="o", label=f"adapter {adapter}")
    ax.set(title=f"{title}: training loss per adapter", xlabel="round", ylabel="training loss")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if curves:
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]], *, rotation: int) -> None:
    """One bar per series in each group, side by side, the groups named under them."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, groups, rotation=rotation, fontsize=8)


def plot_rouge1(table: dict, path: Path, title: str) -> str:
    plt = _pyplot()
    modes = list(table)
    tasks = list(dict.fromkeys(t for row in table.values() for t in row))
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(tasks) + 2), 3.4))
    _grouped_bars(ax, tasks, {mode: [table[mode].get(t, 0.0) for t in tasks] for mode in modes}, rotation=20)
    ax.set(title=f"{title}: ROUGE-1 per task and routing mode", ylabel="ROUGE-1", ylim=(0, _top(table)))
    if modes:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(plt, fig, path)


def plot_matrix(matrix: tuple, path: Path, title: str, counted: str) -> str:
    plt = _pyplot()
    tasks, adapters, counts = matrix
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(adapters) + 2.5), max(3.0, 0.45 * len(tasks) + 1.5)))
    ax.imshow(counts, cmap="Blues", aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(adapters)):
            dark = counts[i, j] > counts.max() / 2
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(adapters)), adapters)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_title(f"{title}:\ntrue task x adapter ({counted})", fontsize=10)  # two lines: a narrow chart
    ax.set_xlabel("adapter (global cluster)")
    return _save(plt, fig, path)


def plot_centroids(points: dict, path: Path, title: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    for client, xy in points["local"].items():
        ax.scatter(xy[:, 0], xy[:, 1], s=30, alpha=0.7, label=f"client {client} (local)")
    glob = points["global"]
    ax.scatter(glob[:, 0], glob[:, 1], s=160, marker="X", color="black", label="global")
    for g, (x, y) in enumerate(glob):
        ax.annotate(str(g), (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set(title=f"{title}: centroids (PCA to 2-D)", xticks=[], yticks=[])
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_cost(times: dict, sent: dict, path: Path, title: str) -> str:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.5, 3.0))
    left.barh(list(times), list(times.values()), color="tab:blue")
    left.set(title=f"{title}: time per phase", xlabel="seconds")
    left.invert_yaxis()
    names = list(sent)
    y = np.arange(len(names))
    right.barh(y - 0.2, [sent[n][0] / 1e6 for n in names], 0.4, label="up")
    right.barh(y + 0.2, [sent[n][1] / 1e6 for n in names], 0.4, label="down")
    right.set_yticks(y, names)
    right.invert_yaxis()
    right.set(title="bytes per phase", xlabel="MB")
    right.legend(fontsize=7)
    return _save(plt, fig, path)


def _top(table: dict) -> float:
    values = [v for row in table.values() for v in row.values() if v is not None and not np.isnan(v)]
    return max([1.0, *values]) * 1.1


def plot_runs(rows: dict[str, dict[str, float]], path: Path) -> str:
    """ROUGE-1 (overall) per run, one bar per test set/routing mode."""
    plt = _pyplot()
    runs = list(rows)
    modes = list(dict.fromkeys(m for row in rows.values() for m in row))
    fig, ax = plt.subplots(figsize=(max(5.5, 1.2 * len(runs) + 3), 3.4))
    _grouped_bars(ax, runs, {mode: [rows[r].get(mode, np.nan) for r in runs] for mode in modes}, rotation=15)
    ax.set(title="ROUGE-1 per run", ylabel="ROUGE-1", ylim=(0, _top(rows)))
    if modes:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(plt, fig, path)


# --- the page -----------------------------------------------------------------------------------------------

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}th:first-child,td:first-child{text-align:left}
img{max-width:100%;display:block;margin:.5em 0 1.5em}"""


def _e(value) -> str:
    return html.escape(str(value))


def _num(value: float, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[tuple[str, list[str]]], table_id: str) -> str:
    """A table whose rows carry ``data-key`` (the test reads cells by row key and column)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        f'<tr data-key="{_e(key)}">' + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>" for key, cells in rows
    )
    return f'<table id="{_e(table_id)}"><tr>{head}</tr>{body}</table>'


def _img(name: str, alt: str) -> str:
    return f'<img src="{_e(name)}" alt="{_e(alt)}">'


def _matrix_section(
    heading: str, note: str, matrix: tuple, path: Path, title: str, counted: str, table_id: str | None = None
) -> list[str]:
    """A task x adapter heatmap and its table (rows: tasks; ``table_id`` defaults to the PNG's name)."""
    tasks, adapters, counts = matrix
    return [
        f"<h3>{_e(heading)}</h3>",
        f"<p>{_e(note)}</p>",
        _img(plot_matrix(matrix, path, title, counted), path.stem),
        _table(
            ["task", *(f"adapter {a}" for a in adapters)],
            [(t, [t, *(str(n) for n in counts[i])]) for i, t in enumerate(tasks)],
            table_id or path.stem,
        ),
    ]


def adapter_names(run_dir: Path, metrics: dict) -> list[str]:
    """Each global cluster's name: the router artifact's (renames included), else the run's own from its
    clustering; none for a method without global clusters."""
    clustering = metrics.get("clustering", {})
    if (run_dir / "router" / "router.json").is_file():
        return read_names(run_dir)
    if clustering.get("global_k"):
        return cluster_names(clustering.get("global_cluster_tasks", {}), clustering["global_k"])
    return []


def _run_section(run_dir: Path, metrics: dict, out: Path, prefix: str, title: str) -> str:
    parts = [f"<h2>{_e(title)}</h2>", f"<p>{_e(run_dir)}; method {_e(metrics.get('method', '?'))}</p>"]
    names = adapter_names(run_dir, metrics)
    if names:
        rows = [(adapter_id(g), [adapter_id(g), name]) for g, name in enumerate(names)]
        parts += ["<h3>Adapters</h3>", _table(["adapter", "name"], rows, f"{prefix}names")]
    curves = loss_curves(metrics)
    if curves:
        parts += [
            "<h3>Training loss per adapter</h3>",
            _img(plot_loss(curves, out / f"{prefix}loss.png", title), "loss"),
        ]
        parts.append(
            _table(
                ["adapter", "rounds trained", "first loss", "final loss"],
                [(a, [a, str(len(p)), _num(p[0][1], 4), _num(p[-1][1], 4)]) for a, p in curves.items()],
                f"{prefix}loss",
            )
        )
    rouge = rouge1_by_task(metrics)
    if rouge:
        tasks = list(dict.fromkeys(t for row in rouge.values() for t in row))
        parts += [
            "<h3>ROUGE-1 per task and routing mode</h3>",
            _img(plot_rouge1(rouge, out / f"{prefix}rouge1.png", title), "rouge1"),
            _table(
                ["task", *rouge],
                [(t, [t, *(_num(rouge[m].get(t)) for m in rouge)]) for t in tasks],
                f"{prefix}rouge1",
            ),
        ]
    matrix = task_adapter_matrix(metrics)
    if matrix is not None:
        parts += _matrix_section(
            "Clustering: true task x adapter",
            "Training samples per true task and global cluster (the adapter they train), from the clustering.",
            matrix,
            out / f"{prefix}routing.png",
            title,
            "training samples",
        )
    for mode, routed in routed_matrices(metrics).items():
        parts += _matrix_section(
            f"Routing of the test samples: {mode}",
            "Test samples per true task and the adapter the router chose for them (the label only counts).",
            routed,
            out / f"{prefix}routed-{mode.replace('/', '-')}.png",
            f"{title}, {mode}",
            "test samples",
            f"{prefix}routed-{mode}",
        )
    try:
        points = centroids_2d(run_dir)
    except (OSError, ValueError) as err:
        points = None
        parts.append(f"<p>centroids: cannot read ({_e(err)})</p>")
    if points is not None:
        parts += [
            "<h3>Centroids</h3>",
            _img(plot_centroids(points, out / f"{prefix}centroids.png", title), "centroids"),
        ]
    times, sent = phase_times(metrics), phase_bytes(metrics)
    parts += [
        "<h3>Time and bytes per phase</h3>",
        _img(plot_cost(times, sent, out / f"{prefix}cost.png", title), "cost"),
        _table(
            ["phase", "seconds", "bytes up", "bytes down"],
            [(p, [p, _num(s, 1), *(str(v) for v in sent.get(p, ("", "")))]) for p, s in times.items()],
            f"{prefix}cost",
        ),
    ]
    return "\n".join(parts)


def _names(run_dirs: list[Path]) -> list[str]:
    names = [Path(r).resolve().name for r in run_dirs]
    return names if len(set(names)) == len(names) else [f"{i + 1}-{n}" for i, n in enumerate(names)]


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write the page and its PNGs; returns the page's path. ``out`` defaults to ``RUN/report`` for one run."""
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ConfigError("report needs at least one run folder")
    if out is None:
        if len(run_dirs) > 1:
            raise ConfigError("several runs: name the report's folder with --out DIR")
        out = run_dirs[0] / REPORT_DIR
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(r, load_run(r)) for r in run_dirs]
    names = _names(run_dirs)
    single = len(runs) == 1
    body = [f"<h1>FedRouter run report: {_e(', '.join(names))}</h1>"]
    if not single:
        rows = {
            n: {m: v["overall"] for m, v in rouge1_by_task(metrics).items()}
            for n, (_, metrics) in zip(names, runs, strict=True)
        }
        modes = list(dict.fromkeys(m for row in rows.values() for m in row))
        table_rows = []
        for name, (_, metrics) in zip(names, runs, strict=True):
            sent = metrics.get("bytes", {})
            table_rows.append(
                (
                    name,
                    [
                        name,
                        str(metrics.get("method", "?")),
                        *(_num(rows[name].get(m)) for m in modes),
                        _num(float(metrics.get("wall_s", 0.0)), 1),
                        str(int(sent.get("up_total", 0)) + int(sent.get("down_total", 0))),
                    ],
                )
            )
        body += [
            "<h2>Runs side by side</h2>",
            _table(["run", "method", *(f"ROUGE-1 {m}" for m in modes), "seconds", "bytes"], table_rows, "runs"),
            _img(plot_runs(rows, out / "runs.png"), "runs"),
        ]
    for name, (run_dir, metrics) in zip(names, runs, strict=True):
        body.append(_run_section(run_dir, metrics, out, "" if single else f"{name}-", name))
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>FedRouter report: {_e(', '.join(names))}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path = out / PAGE
    path.write_text(page, encoding="utf-8")
    return path
