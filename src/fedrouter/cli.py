"""The ``fedrouter`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fedrouter.bench import PROFILES as BENCH_PROFILES
from fedrouter.bench import STANDARD as BENCH_STANDARD
from fedrouter.config import SETTINGS, Config, load_config, parse_overrides
from fedrouter.errors import ConfigError, FedRouterError
from fedrouter.export import FORMATS as EXPORT_FORMATS

DEFAULT_BENCH_OUT = Path("benchmarks/results")
LOST_CLIENTS = 3  # the exit status of a run that finished without some client
EXIT_STATUS = (
    "exit status: 0 the run finished and every client took part through the end; 3 it finished, but some client "
    "was lost (never joined, crashed, its node died, no reply in time, or a reply was rejected): the summary names "
    "each one and the phases it missed; 1 the run failed; 2 a setting or input error"
)
ALLOW_LOST = "exit 0 also when the run finished without some client (the summary still names them)"

# Shortcuts for the most used settings; every setting is also reachable as KEY=VALUE.
SHORTCUTS = {
    "clients": "data.num_clients",
    "rounds": "run.rounds",
    "scenario": "data.scenario",
    "model": "model.name",
    "data": "data.source",
    "seed": "run.seed",
    "output": "run.output_dir",
    "name": "run.name",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrouter", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a federated experiment in Flower's simulation", epilog=EXIT_STATUS)
    run.add_argument("--config", type=Path, help="TOML file of settings (see `fedrouter config`)")
    for flag, key in SHORTCUTS.items():
        run.add_argument(f"--{flag}", dest=key, help=f"same as {key}=VALUE")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any setting, e.g. train.lr=1e-4")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--allow-lost-clients", action="store_true", help=ALLOW_LOST)
    run.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="go on with an interrupted run from its last checkpoint"
    )

    deploy = commands.add_parser(
        "deploy-local",
        help="run on a real Flower deployment on this machine: a SuperLink and N SuperNodes on loopback",
        epilog=EXIT_STATUS,
    )
    deploy.add_argument(
        "--nodes", type=int, required=True, help="SuperNodes to start, one client each (sets data.num_clients)"
    )
    deploy.add_argument("--tls", action="store_true", help="TLS with a generated certificate authority")
    deploy.add_argument("--auth", action="store_true", help="SuperNode authentication with generated node keys")
    deploy.add_argument(
        "--node-data", type=Path, action="append", metavar="PATH",
        help="one data folder or file per node, in node order (default: each node's partition of data.source)",
    )  # fmt: skip
    deploy.add_argument("--folder", type=Path, help="logs, certificates and Flower state (default: RUN_DIR-deployment)")
    deploy.add_argument("--config", type=Path, help="TOML file of settings")
    for flag, key in SHORTCUTS.items():
        deploy.add_argument(f"--{flag}", dest=key, help=f"same as {key}=VALUE")
    deploy.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any setting, e.g. train.lr=1e-4")
    deploy.add_argument("--quiet", action="store_true", help="no progress display")
    deploy.add_argument("--allow-lost-clients", action="store_true", help=ALLOW_LOST)

    gen = commands.add_parser("generate", help="route prompts to a trained run's adapters and generate answers")
    gen.add_argument("--run", required=True, type=Path, help="run folder (holds router/)")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    gen.add_argument("--mode", choices=("global", "local"), default="global")
    gen.add_argument("--client", type=int, help="client whose local clusters route (mode local)")
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sample")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, help="makes sampling reproducible")
    gen.add_argument("--stop", action="append", default=[], help="end the answer before this text (repeatable)")
    gen.add_argument("--model", help="base model to load instead of the recorded one")
    gen.add_argument(
        "--force-base",
        action="store_true",
        help="generate on --model even where its weights are not the ones the adapters were trained on",
    )
    _fallback_flags(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object per answer")

    # Each flag but RUN_DIR, --model, --force-base, --precision and the fallback's (what to load) is a field of
    # ServeOptions (same name): its defaults are these.
    from fedrouter.serving.options import BACKENDS, ServeOptions

    served = ServeOptions()
    serve = commands.add_parser(
        "serve", help="serve a trained run over an OpenAI-compatible HTTP API that routes every request"
    )
    serve.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder (holds router/)")
    serve.add_argument("--host", default=served.host, help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=served.port)
    serve.add_argument(
        "--api-key",
        default=os.environ.get("FEDROUTER_API_KEY") or None,  # set but empty: no key, as unset
        help="require 'Authorization: Bearer KEY' on /v1/ (default: $FEDROUTER_API_KEY; none: open)",
    )
    serve.add_argument("--max-batch", type=int, default=served.max_batch, help="most requests decoded in one batch")
    serve.add_argument(
        "--max-queue", type=int, default=served.max_queue, help="most requests waiting or answered; then 429"
    )
    serve.add_argument(
        "--max-batch-tokens",
        type=int,
        default=served.max_batch_tokens,
        help="most padded positions (rows x longest prompt + answer) in one batch; a longer request runs alone",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=served.request_timeout,
        metavar="SECONDS",
        help="close a connection whose request has not fully arrived this long after it began",
    )
    serve.add_argument("--model", help="base model to load instead of the recorded one")
    serve.add_argument(
        "--force-base",
        action="store_true",
        help="serve on --model even where its weights are not the ones the adapters were trained on",
    )
    serve.add_argument(
        "--backend",
        choices=BACKENDS,
        default=served.backend,
        help="who generates: this process (default) or a vLLM server (FedRouter then only embeds and routes)",
    )
    serve.add_argument("--vllm-url", help="the vLLM server's base URL, e.g. http://127.0.0.1:8001 (backend vllm)")
    serve.add_argument("--vllm-model", help="the base model's name on the vLLM server (default: the recorded one)")
    serve.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="instead of the recorded one")
    _fallback_flags(serve)

    rename = commands.add_parser(
        "rename",
        help="give a trained run's clusters readable names (the adapter ids cluster_<g> stay as they are)",
    )
    rename.add_argument("run_dir", type=Path, metavar="RUN", help="run folder (holds router/) or a router folder")
    rename.add_argument("renames", nargs="+", metavar="CLUSTER=NAME", help="e.g. cluster_2=summaries")

    export = commands.add_parser(
        "export",
        help="write a trained run's adapters (PEFT folders with model cards, the exact base), merged models or a "
        "vLLM command, and its router, for use outside FedRouter",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN", help="run folder (holds router/) or a router folder")
    export.add_argument("out", type=Path, metavar="OUT", help="the folder to write (new, or empty)")
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="peft",
        help="peft (default): base/, adapters/ with model cards, router/; merged: one merged model per adapter; "
        "vllm: as peft, plus vllm.sh with the vllm serve command and the fedrouter serve line in front of it",
    )
    export.add_argument(
        "--link", action="store_true", help="base/ is a symbolic link to the base's folder instead of a copy"
    )
    export.add_argument(
        "--adapter-base",
        metavar="NAME",
        help="what each adapter_config.json names as its base (default: OUT/base's absolute path; a hub model: its id)",
    )
    export.add_argument("--vllm-port", type=int, default=8001, help="vllm: the port vLLM listens on")
    export.add_argument("--port", type=int, default=8000, help="vllm: the port fedrouter serve listens on")

    data = commands.add_parser("data", help="look at a data source before training on it")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    inspect = data_commands.add_parser(
        "inspect",
        help="what was read: format, columns, rows per split, task and client, token lengths, a rendered example",
    )
    inspect.add_argument("data.source", metavar="PATH", help="the data file or folder (data.source=PATH)")
    inspect.add_argument("--config", type=Path, help="TOML file of settings (see `fedrouter config`)")
    for flag in ("clients", "model", "seed", "scenario"):
        inspect.add_argument(f"--{flag}", dest=SHORTCUTS[flag], help=f"same as {SHORTCUTS[flag]}=VALUE")
    inspect.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any setting, e.g. data.format=alpaca")

    show = commands.add_parser("config", help="print every setting with its resolved value and meaning")
    show.add_argument("--config", type=Path)
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    bench = commands.add_parser("bench", help="run the standard benchmark paper4-raw-cpu; write results, tables, plots")
    bench.add_argument(
        "--profile",
        choices=sorted(BENCH_PROFILES),
        default=BENCH_STANDARD,
        help=f"{BENCH_STANDARD} (the standard, v2), quick (~20 minutes: 4 clients, 2 rounds, seed 0), paper4-cpu "
        "(v1, retired: --report-only)",
    )
    bench.add_argument("--quick", action="store_true", help="the same as --profile quick")
    bench.add_argument(
        "--methods", default="", help="comma-separated methods (default: every registered one, plugins included)"
    )
    bench.add_argument("--scenarios", help="comma-separated: single,dual,all,flan16-dual (default: single,dual,all)")
    bench.add_argument("--seeds", help="comma-separated seeds (default: the profile's)")
    bench.add_argument(
        "--data", type=Path, default=Path("../shared/data"), help="folder with paper4-raw/ (paper4/) and flan16/"
    )
    bench.add_argument("--out", type=Path, default=DEFAULT_BENCH_OUT, help="results, tables and plots")
    bench.add_argument("--runs", type=Path, default=Path("benchmarks/runs"), help="run folders of each run")
    bench.add_argument(
        "--report-only", action="store_true", help="no runs: remake tables and plots from the results file"
    )
    bench.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="change a setting of every run: a variant of the protocol, so it needs an --out of its own",
    )

    report = commands.add_parser(
        "report", help="an HTML page and PNG charts of one or more finished runs (opens from disk)"
    )
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders (with metrics.json)")
    report.add_argument(
        "--out", type=Path, help="the report's folder (default: RUN/report for one run; needed for several)"
    )

    cache = commands.add_parser("prepare-model", help="dequantize and cache the embedded model (or another)")
    cache.add_argument("--model", default="smollm2")
    return parser


def _config(args: argparse.Namespace) -> Config:
    overrides = parse_overrides(args.overrides)
    for key in SHORTCUTS.values():
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    resume = getattr(args, "resume", None)
    if resume is not None:
        if args.config is not None:
            raise ConfigError("--resume reads the run's own config.toml; drop --config")
        if not (resume / "config.toml").is_file():
            raise ConfigError(f"--resume {resume}: no config.toml there (expected a run folder)")
        return load_config(resume / "config.toml", overrides | {"run.resume": str(resume)})
    return load_config(args.config, overrides)


def _partition(cfg) -> str:
    partition = cfg["data.partition"]
    if partition == "scenario":
        return f"scenario {cfg['data.scenario']}"
    if partition == "dirichlet":
        return f"dirichlet partition (alpha {cfg['data.dirichlet_alpha']})"
    return f"partition by {partition}"


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedrouter.data import data_notes
    from fedrouter.report import ProgressFollower, summary_tables
    from fedrouter.runlog import default_run_dir
    from fedrouter.simulation import check_inputs, run_experiment
    from fedrouter.tracking import viewing

    cfg = _config(args)
    console = Console(stderr=True)
    run_dir = Path(cfg["run.resume"]) if cfg["run.resume"] else default_run_dir(cfg)
    console.print(
        f"{cfg['run.method']}: {cfg['data.num_clients']} clients, {_partition(cfg)}, {cfg['run.rounds']} rounds, "
        f"model {cfg['model.name']}, data {cfg['data.source']} -> {run_dir}"
    )
    check_inputs(cfg)  # a data or model error, before Ray or any model starts
    for note in data_notes(cfg):
        console.print(f"data: {note}", soft_wrap=True)
    if args.quiet:
        run_dir, metrics = run_experiment(cfg, run_dir)
    else:
        with ProgressFollower(run_dir, cfg["data.num_clients"], cfg["run.rounds"], console):
            run_dir, metrics = run_experiment(cfg, run_dir)
    out = Console()
    for table in summary_tables(metrics, stored_names(run_dir)):
        out.print(table)
    router = ", router/" if (run_dir / "router").is_dir() else ""
    out.print(f"run folder: {run_dir} (metrics.json, config.toml, log.txt{router})")
    for line in viewing(cfg["run.report_to"], run_dir):
        out.print(f"tracking: {line}", soft_wrap=True)
    write_run_report(run_dir, console)
    return _exit_status(metrics, args.allow_lost_clients)


def stored_names(run_dir: Path) -> list[str] | None:
    """The clusters' names as the run's router artifact keeps them (renames included); None without one."""
    from fedrouter.serving.artifact import read_names

    return read_names(run_dir) if (run_dir / "router" / "router.json").is_file() else None


def write_run_report(run_dir: Path, console) -> None:
    """Best effort: the run's report in RUN/report; a failure warns and never changes the run's exit status."""
    try:
        from fedrouter.run_report import write_report

        console.print(f"report: {write_report([run_dir])}")
    except Exception as err:  # the run itself succeeded: the report is extra
        console.print(f"[yellow]warning: no run report ({type(err).__name__}: {err})")


def _report(args: argparse.Namespace) -> int:
    from fedrouter.run_report import write_report

    print(write_report(args.runs, args.out))
    return 0


def _deploy_local(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedrouter.deploy import LocalDeployment
    from fedrouter.report import ProgressFollower, summary_tables
    from fedrouter.runlog import default_run_dir
    from fedrouter.simulation import check_inputs

    if args.nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {args.nodes}")
    cfg = _config(args).replace(data__num_clients=args.nodes)
    if args.node_data:
        if len(args.node_data) != args.nodes:
            raise ConfigError(f"--node-data given {len(args.node_data)} times for {args.nodes} nodes (one per node)")
        for path in args.node_data:
            if not path.exists():
                raise ConfigError(f"--node-data {path}: no such file or folder")
    else:
        check_inputs(cfg)
    run_dir = default_run_dir(cfg)
    cfg = cfg.replace(run__name=run_dir.name, run__output_dir=str(run_dir.parent.resolve()))
    folder = args.folder or run_dir.with_name(run_dir.name + "-deployment")
    console = Console(stderr=True)
    console.print(
        f"deployment: 1 SuperLink + {args.nodes} SuperNodes on 127.0.0.1{' with TLS' if args.tls else ''}"
        f"{' and node authentication' if args.auth else ''} "
        f"(logs in {folder}); {cfg['run.method']}, {cfg['run.rounds']} rounds -> {run_dir}"
    )
    with LocalDeployment(folder, args.nodes, tls=args.tls, auth=args.auth, data_paths=args.node_data) as deployment:
        if args.quiet:
            run_dir, metrics = deployment.run(cfg)
        else:
            with ProgressFollower(run_dir, args.nodes, cfg["run.rounds"], console):
                run_dir, metrics = deployment.run(cfg)
    out = Console()
    for table in summary_tables(metrics, stored_names(run_dir)):
        out.print(table)
    out.print(f"run folder: {run_dir}; every SuperLink and SuperNode process has been stopped")
    return _exit_status(metrics, args.allow_lost_clients)


def _exit_status(metrics: dict, allow_lost: bool) -> int:
    """0 when every client took part through the end (or ``allow_lost``), else LOST_CLIENTS (see EXIT_STATUS)."""
    from fedrouter.report import describe_lost, lost_clients

    lost = lost_clients(metrics)
    if not lost or allow_lost:
        return 0
    print(
        f"fedrouter: the run finished without {len(lost)} client(s), exit status {LOST_CLIENTS} "
        f"(--allow-lost-clients: 0):\n{describe_lost(lost)}",
        file=sys.stderr,
    )
    return LOST_CLIENTS


def _fallback_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fallback",
        help="where a prompt far from its cluster goes: none, base, or a cluster's index or name (default: the "
        "run's routing.fallback)",
    )
    parser.add_argument(
        "--fallback-factor",
        type=float,
        help="how far, in units of the cluster's radius (default: the run's routing.fallback_factor)",
    )


def _generate(args: argparse.Namespace) -> int:
    from fedrouter.serving.router import Router

    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--prompts-file {args.prompts_file}: cannot read ({err})") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError("generate needs --prompt TEXT or --prompts-file FILE")
    if args.model and not args.force_base:  # another base than the recorded one is refused, naming both
        from fedrouter.serving.artifact import check_base

        check_base(args.run, args.model)
    router = Router.load(args.run, model=args.model, fallback=args.fallback, fallback_factor=args.fallback_factor)
    try:
        answers = router.generate(
            prompts,
            mode=args.mode,
            client=args.client,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
        )
    except ValueError as err:  # a sampling setting out of range, a prompt too long for the model
        raise ConfigError(f"generate: {err}") from None
    for answer in answers:
        if args.json:
            fields = ("prompt", "adapter", "name", "distance", "fallback", "text", "finish_reason")
            print(json.dumps({name: getattr(answer, name) for name in fields}))
        else:
            served = f"{answer.name}, fallback" if answer.fallback else answer.name
            print(f"[{served}] {answer.prompt!r}\n  -> {answer.text}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fedrouter.serving.api import create_app
    from fedrouter.serving.options import ServeOptions
    from fedrouter.serving.router import Router

    options = ServeOptions.of(vars(args))  # every limit checked here, once, before anything is loaded
    if options.exposed:
        print(
            f"fedrouter: warning: serving on {options.host} without --api-key: anyone who reaches it can use it",
            file=sys.stderr,
        )
    # The server's own lines (loading, ready, one access line per request) go to stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedrouter").addHandler(handler)
    logging.getLogger("fedrouter").setLevel(logging.INFO)
    if args.model and not args.force_base:  # another base than the recorded one is refused, naming both
        from fedrouter.serving.artifact import check_base

        check_base(args.run_dir, args.model)
    router = Router.load(
        args.run_dir,
        model=args.model,
        precision=args.precision,
        fallback=args.fallback,
        fallback_factor=args.fallback_factor,
    )
    gateway = None
    if options.backend == "vllm":
        from fedrouter.serving.gateway import VllmGateway

        gateway = VllmGateway(router, options.vllm_url, options.vllm_model or router.artifact.base_model)
    app = create_app(router, options, gateway=gateway)
    print(
        f"fedrouter: serving {args.run_dir} ({router.num_adapters} adapters) on http://{options.host}:{options.port}/"
        " (warming up: /health says ready when it is done)",
        flush=True,
    )
    uvicorn.run(app, log_level="warning", **options.uvicorn())  # its limits: ServeOptions.uvicorn
    return 0


def _rename(args: argparse.Namespace) -> int:
    from fedrouter.serving.artifact import rename_clusters

    renames: dict[str, str] = {}
    for item in args.renames:
        cluster, equals, name = item.partition("=")
        if not equals:
            raise ConfigError(f"rename: {item!r:.80} is not CLUSTER=NAME (e.g. cluster_2=summaries)")
        if cluster in renames:
            raise ConfigError(f"rename: {cluster!r:.80} is given twice")
        renames[cluster] = name
    for g, name in enumerate(rename_clusters(args.run_dir, renames)):
        print(f"cluster_{g}: {name}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedrouter.export import export

    done = export(
        args.run_dir,
        args.out,
        args.format,
        link=args.link,
        adapter_base=args.adapter_base,
        vllm_port=args.vllm_port,
        port=args.port,
    )
    for command in done.commands:
        print(command)
    print(f"fedrouter: exported {args.run_dir} to {done.out} ({args.format}; README.md says what is where)")
    return 0


def _data(args: argparse.Namespace) -> int:
    from fedrouter.data.inspect import inspect_report, print_report

    print_report(inspect_report(_config(args)))
    return 0


def _show_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, parse_overrides(args.overrides))
    for key, value in cfg.items():
        print(f"{key} = {value!r}  # {SETTINGS[key].help}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fedrouter import bench
    from fedrouter.bench.report import write_report

    profile = "quick" if args.quick else args.profile
    from fedrouter.methods import methods as registered

    known = list(registered())
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or known
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown} (expected some of {', '.join(known)})")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()] if args.scenarios else list(bench.SCENARIOS)
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated whole numbers, got {args.seeds!r}") from None
    overrides = parse_overrides(args.overrides)
    if overrides:
        Config(overrides, where="command line")
        if args.out.resolve() == DEFAULT_BENCH_OUT.resolve():
            raise ConfigError(
                f"settings {', '.join(overrides)} change the benchmark's protocol: write such runs to another "
                f"--out than {DEFAULT_BENCH_OUT}, so they never mix with the standard results"
            )
    if not args.report_only:
        for needed in {"flan16" if s == bench.MANY_TASK else bench.PROFILES[profile].data for s in scenarios}:
            if not (args.data / needed / "train.jsonl").is_file():
                raise ConfigError(f"--data: {args.data / needed} has no train.jsonl (the benchmark data)")
        bench.run_bench(
            profile,
            out=args.out,
            data_root=args.data,
            runs_dir=args.runs,
            methods=methods,
            scenarios=scenarios,
            seeds=seeds,
            overrides=overrides,
        )
    path = bench.results_path(args.out, profile)
    records = bench.read_records(path)
    if not records:
        raise ConfigError(f"{path}: no results yet (run without --report-only first)")
    tsne_path = path.with_name(path.stem + "-tsne.json")
    has_all = any(r["scenario"] == "all" for r in records)  # the t-SNE plot shows the 'all' scenario's embeddings
    data = args.data / bench.PROFILES[profile].data
    if has_all and not tsne_path.exists() and not args.report_only and (data / "train.jsonl").is_file():  # once
        print("t-SNE of the 'all' scenario's embeddings ...")
        tsne_path.write_text(json.dumps(bench.tsne_points(profile, args.data)))
    tsne = json.loads(tsne_path.read_text()) if tsne_path.exists() else None
    command = "fedrouter bench" + (f" --profile {profile}" if profile != bench.STANDARD else "")
    if overrides:
        command += f" --out {args.out} " + " ".join(f"{key}={value}" for key, value in overrides.items())
    notes_path = path.with_name(path.stem + "-timing-notes.json")  # runs whose wall time is not comparable
    notes = json.loads(notes_path.read_text()) if notes_path.exists() else None
    for written in write_report(records, args.out, path.stem, command, tsne, notes):
        print(f"wrote {written}")
    return 0


def _prepare_model(args: argparse.Namespace) -> int:
    import time

    from fedrouter.model.loading import load_base_model

    started = time.perf_counter()
    base = load_base_model(args.model)
    print(f"{args.model}: ready ({base.hidden_size}-d, {time.perf_counter() - started:.1f}s)")
    return 0


class _HideKnownDeprecation(logging.Filter):
    """Drops Flower's notice that `run_simulation` is deprecated: `simulation.py` says why it is used."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    flwr = logging.getLogger("flwr")
    flwr.setLevel(logging.WARNING)
    flwr.propagate = False
    flwr.addFilter(_HideKnownDeprecation())
    # The run's progress display shows fedrouter's events; its full log goes to RUN_DIR/log.txt.
    logging.getLogger("fedrouter").propagate = False


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    handlers = {
        "run": _run,
        "deploy-local": _deploy_local,
        "generate": _generate,
        "serve": _serve,
        "rename": _rename,
        "export": _export,
        "config": _show_config,
        "bench": _bench,
        "report": _report,
        "prepare-model": _prepare_model,
        "data": _data,
    }
    try:
        return handlers[args.command](args)
    except (FedRouterError, FileExistsError) as err:
        print(f"fedrouter: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a run that failed: the reason is in the run's events
        print(f"fedrouter: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
