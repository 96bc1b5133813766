"""The ServerApp logic: ask for clusters, group them globally, train and average the shared adapters, evaluate.

``run_fedrouter(grid, cfg, run_dir)`` drives a whole run over a Flower ``Grid``; it is the same in simulation
and in a deployment, and the same for every method: a ``FederatedRun`` calls the method's hooks
(``fedrouter.methods``) for what differs. Talking to clients is ``transport``, who takes part with which
clusters is ``membership``; every reply is validated before use (``records``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedrouter import discovery
from fedrouter.algorithm.aggregation import Update
from fedrouter.algorithm.evaluation import summarize_evaluation
from fedrouter.algorithm.scheduling import learning_rate
from fedrouter.arrays import Arrays
from fedrouter.config import Config
from fedrouter.errors import ReplyError, RunError
from fedrouter.federated import membership, records, robust, wire
from fedrouter.federated.checkpoint import ServerState, load_checkpoint, save_checkpoint
from fedrouter.federated.records import (
    check_adapter,
    check_metric_keys,
    check_new_adapter,
    config_record,
    get_arrays,
    get_metrics,
    record_bytes,
    to_record,
)
from fedrouter.federated.transport import exchange, reject, wait_for_nodes
from fedrouter.methods import ClientClusters, Job, global_radii, make_method, part_of
from fedrouter.model import LoraSettings, base_model_id
from fedrouter.run_metrics import RunMetrics
from fedrouter.runlog import RunFolder
from fedrouter.serving.artifact import RouterArtifact

__all__ = ["FederatedRun", "RunError", "run_fedrouter"]


def run_fedrouter(grid: Grid, cfg: Config, run_dir: Path, resume: bool = False) -> RunMetrics:
    """Run the configured method end to end; writes metrics, a checkpoint per round (and a router artifact).

    ``resume``: go on from ``run_dir``'s checkpoint instead of starting over.
    """
    run = RunFolder(run_dir, cfg, resumed=resume)
    try:
        return FederatedRun(grid, cfg, run).execute(resume)
    except Exception as err:
        run.event("failed", error=str(err))
        raise
    finally:
        run.close()


class FederatedRun:
    """One run: the grid, the settings, the run folder, the method and, once clustered, the server's state."""

    def __init__(self, grid: Grid, cfg: Config, run: RunFolder) -> None:
        self.grid, self.cfg, self.run = grid, cfg, run
        self.method = make_method(cfg)
        self.state: ServerState | None = None

    def execute(self, resume: bool) -> RunMetrics:
        """Cluster (or resume), train every round, evaluate; the final metrics."""
        cfg, run, method = self.cfg, self.run, self.method
        started = time.time()
        n = cfg["data.num_clients"]
        run.event(
            "start",
            clients=n,
            rounds=cfg["run.rounds"],
            model=cfg["model.name"],
            scenario=cfg["data.scenario"],
            method=method.name,
        )
        nodes = wait_for_nodes(self.grid, cfg["run.min_clients"] or n, cfg["run.reply_timeout_s"], run)
        self.state = state = self.resume(nodes) if resume else self.start(nodes)
        metrics = state.metrics
        elapsed_before = metrics.get("elapsed_s", 0.0)

        def save() -> None:
            metrics["elapsed_s"] = elapsed_before + time.time() - started
            run.write_metrics(metrics)
            if method.routes:  # only routers have a router artifact; the other methods report metrics
                self.router_artifact().with_task_names(metrics["clustering"]["global_cluster_tasks"]).save(run.path)
            save_checkpoint(run.path, state, cfg["run.seed"])

        save()
        rounds = cfg["run.rounds"] if method.trains else 0  # zero-shot: clustering, then evaluation
        for r in range(state.rounds_done, rounds):
            membership.admit_late_clients(self.grid, cfg, run, method, state)
            record = self.train_round(r)
            if cfg["eval.round_samples"] and "personalized" in cfg.eval_sets:
                curve = self.evaluate(limit=cfg["eval.round_samples"])
                record["eval"] = curve["evaluation"]["overall"]
            metrics["rounds"].append(record)
            state.rounds_done = r + 1
            save()  # metrics and checkpoint first: whoever sees the "round" event can rely on the round being saved
            run.event("round", **record)

        metrics["phases"]["training_s"] = sum(r["seconds"] for r in metrics["rounds"])
        metrics["bytes"] = {
            "up_total": sum(r["bytes_up"] for r in metrics["rounds"]) + metrics["clustering_bytes_up"],
            "down_total": sum(r["bytes_down"] for r in metrics["rounds"]) + metrics.get("clustering_bytes_down", 0),
            "adapter_bytes": int(sum(v.nbytes for v in state.initial.values())),
        }
        if cfg.eval_sets:
            metrics.update(self.evaluate())
        metrics["wall_s"] = elapsed_before + time.time() - started
        metrics["elapsed_s"] = metrics["wall_s"]
        run.write_metrics(metrics)
        run.event("done", wall_s=metrics["wall_s"], evaluation=metrics.get("evaluation", {}).get("overall", {}))
        return metrics

    # --- 1-4: clustering ---

    def start(self, nodes: list[int]) -> ServerState:
        """Local clustering on every client (centroids and counts come back), then the global grouping, and
        as many refinement rounds as the method asks for."""
        grid, cfg, run, method = self.grid, self.cfg, self.run, self.method
        run.event("phase", name="clustering", round=0)
        t0 = time.time()
        clients, figures = membership.cluster_clients(grid, cfg, run, method, nodes, None, set())
        if len(clients) < cfg["run.min_replies"]:
            reasons = "; ".join(f"{who}: {why}" for who, why in list(figures["rejected"].items())[:3])
            raise RunError(
                f"clustering: {len(clients)} valid replies, 'run.min_replies' asks for {cfg['run.min_replies']}"
                + (f" (rejected: {reasons})" if reasons else "")
            )
        initial, initial_bytes = self.initial_adapter(clients)
        centers, global_scores = method.group_clusters(clients)
        local_k_first = {c.client_id: len(c.centroids) for c in clients}
        refinements, refine_up, refine_down = [], 0, 0
        for _ in range(method.refine_rounds()):
            run.event("phase", name="refinement", round=0)
            clients, up, down = membership.refine_clients(grid, cfg, run, method, clients, centers)
            refine_up, refine_down = refine_up + up, refine_down + down
            if len(clients) < cfg["run.min_replies"]:
                raise RunError(f"refinement: {len(clients)} valid replies, 'run.min_replies' asks for more")
            refinements.append(centers)
            centers, global_scores = method.group_clusters(clients)
        metrics: dict = {
            "config": cfg.to_dict(),
            "method": method.name,
            "rounds": [],
            "phases": {"embed_s": figures["embed_s"], "local_cluster_s": figures["local_cluster_s"]},
            "clustering_rejected": figures["rejected"],
            "clustering_bytes_up": figures["bytes_up"] + initial_bytes + refine_up,
            "clustering_bytes_down": refine_down,  # the global centroids each refinement round sends
            "model_loads_per_process": figures["model_loads"],
        }
        state = ServerState(clients, centers, method.shared_adapters(initial, len(centers)), initial, metrics)
        state.refinements = refinements
        state.refused = set(nodes) - {c.node_id for c in clients}
        metrics["clustering"] = membership.clustering_summary(state, method, global_scores)
        metrics["clustering"]["local_k_before_refinement"] = local_k_first
        metrics["phases"]["clustering_s"] = time.time() - t0
        clustering = metrics["clustering"]
        run.event(
            "clustered",
            local_k=clustering["local_k"],
            global_k=clustering["global_k"],
            task_labels=clustering["task_labels"],
            cluster_acc_local=clustering["cluster_acc_local"],
            cluster_acc_global=clustering["cluster_acc_global"],
            global_cluster_tasks=clustering["global_cluster_tasks"],
        )
        return state

    def resume(self, nodes: list[int]) -> ServerState:
        """Load the checkpoint; the clients cluster again (their local state is gone) and must match it."""
        grid, cfg, run, method = self.grid, self.cfg, self.run, self.method
        state, seed = load_checkpoint(run.path)
        if seed != cfg["run.seed"]:
            raise RunError(f"resume: the checkpoint was made with run.seed={seed}, the config says {cfg['run.seed']}")
        if method.personal_state and state.rounds_done > 0:
            raise RunError(
                f"resume: method {method.name!r} keeps personal adapters on the clients, which a new run does not "
                "have; resume supports methods without personal state (fedrouter, oracle, fedit)"
            )
        run.event("resumed", rounds_done=state.rounds_done)
        fresh, _ = membership.cluster_clients(grid, cfg, run, method, nodes, None, set())
        fresh = membership.replay_refinements(grid, cfg, run, method, state, fresh)
        state.refused = set(nodes) - {c.node_id for c in fresh}
        membership.match_returning(run, method, cfg, state, "resume", fresh)
        membership.refresh_clustering_summary(state, method)
        active = [c for c in state.clients if c.node_id >= 0]
        if len(active) < cfg["run.min_replies"]:
            raise RunError(f"resume: {len(active)} clients match the checkpoint, 'run.min_replies' asks for more")
        resumed = {"after_round": state.rounds_done}
        gone = [c.client_id for c in state.clients if c.node_id < 0]  # saved, but not back: no part in what follows
        if gone:
            resumed["lost"] = {f"client {c}": "did not come back (not connected, or new clusters)" for c in gone}
        state.metrics.setdefault("resumed", []).append(resumed)
        return state

    def initial_adapter(self, clients: list[ClientClusters]) -> tuple[Arrays, int]:
        """The common starting adapter, from the first client that sends a valid one; and its size in bytes."""
        cfg = self.cfg
        for client in clients:
            message = Message(RecordDict({"config": config_record(cfg)}), client.node_id, records.INITIAL, group_id="0")
            who = f"client {client.client_id}"
            replies, _ = exchange(self.grid, [message], self.run, "initial adapter", cfg["run.reply_timeout_s"], {})
            for reply in replies:
                try:
                    arrays = get_arrays(reply.content, "initial_adapter", who)
                    adapter = check_new_adapter(arrays, f"{who} initial adapter")
                except ReplyError as err:
                    reject(self.run, "initial adapter", who, str(err))
                    continue
                return adapter, record_bytes(*reply.content.array_records.values())
        raise RunError("initial adapter: no client sent a valid one")

    # --- 5-6: a training round ---

    def train_round(self, r: int) -> dict:
        """Each client trains its jobs; the server averages each shared adapter over the valid replies."""
        cfg, run, method, state = self.cfg, self.run, self.method, self.state
        t0 = time.time()
        rounds = cfg["run.rounds"]
        lr = learning_rate(cfg["train.lr"], r, rounds, cfg["train.lr_schedule"], cfg["train.lr_min_ratio"])
        run.event("phase", name="training", round=r + 1, rounds=rounds, lr=lr)
        active = [c for c in state.clients if c.node_id >= 0]
        by_node = {c.node_id: c for c in active}
        messages, plan = [], {}
        method.schedule(state.clients)
        for client in active:
            jobs = method.jobs(r, client)
            plan[client.node_id] = jobs
            content = RecordDict(
                {"config": config_record(cfg, round=r, lr=lr), "jobs": wire.jobs_record(jobs)}
                | {
                    wire.adapter_key(job.name): to_record(
                        part_of(state.shared[job.shared], job.part), cfg["train.adapter_dtype"]
                    )
                    for job in jobs
                    if job.shared is not None and job.part != "none"
                }
            )
            messages.append(Message(content, client.node_id, records.TRAIN, group_id=str(r + 1)))
        bytes_down = sum(record_bytes(*m.content.array_records.values()) for m in messages)
        phase = f"training round {r + 1}"
        names = {node: f"client {c.client_id}" for node, c in by_node.items()}
        replies, rejected = exchange(self.grid, messages, run, phase, cfg["run.reply_timeout_s"], names)
        updates, reported, bytes_up = [], {}, 0
        for reply in replies:
            node = reply.metadata.src_node_id
            who = names[node]
            bytes_up += record_bytes(*reply.content.array_records.values())
            try:  # every part of a reply is checked before any of it is used
                values = get_metrics(reply.content, "metrics", who)
                mine, reported[who] = self._read_update(reply, by_node[node], plan[node], values, who)
            except ReplyError as err:
                rejected[who] = str(err)
                reject(run, phase, who, str(err))
                continue
            updates += mine
            state.metrics["model_loads_per_process"] = max(
                state.metrics.get("model_loads_per_process", 0), int(values["model_loads"])
            )
        updates, guarded = robust.screen(cfg, state.shared, updates)  # weight caps, update-norm bounds
        for who, why in guarded["rejected"].items():
            rejected[who] = why
            reject(run, phase, who, why)
        losses = defaultdict(list)  # of the replies still accepted
        for mine in (reported[who] for who in reported if who not in rejected):
            for key, loss in mine.items():
                losses[key].append(loss)
        accepted = len(active) - len(rejected)
        counted = accepted >= cfg["run.min_replies"]
        weights: dict = {}
        if counted:
            state.shared, weights, guarded["selected"] = robust.combine(cfg, state.shared, updates)
        else:
            run.event("round_not_counted", round=r + 1, accepted=accepted, min_replies=cfg["run.min_replies"])
        return {
            "round": r + 1,
            "lr": lr,
            "seconds": time.time() - t0,
            "counted": counted,
            "accepted": accepted,
            "rejected": rejected,
            "train_loss": {key: float(np.mean(v)) for key, v in sorted(losses.items())},
            "client_loss": {who: mine for who, mine in reported.items() if who not in rejected},
            "updated_adapters": sorted(weights),
            "adapter_norms": {
                key: float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in arrays.values())))
                for key, arrays in state.shared.items()
            },
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "robust": guarded,  # what aggregate.* capped, clipped, rejected and selected
        }

    def _read_update(
        self, reply: Message, client: ClientClusters, offered: list[Job], values: dict, who: str
    ) -> tuple[list[Update], dict[str, float]]:
        """A client's trained jobs, checked: the jobs the method accepts, on the expected samples, adapters of
        the right shapes, exactly the expected metrics. The updates (shared adapter, arrays, weight, who) and the
        loss per adapter."""
        shapes = {key: value.shape for key, value in self.state.initial.items()}
        trained = [job for job in offered if wire.samples_key(job.name) in values]
        if not self.method.accepts(offered, trained):
            names = [job.name for job in trained]
            raise ReplyError(f"{who}: trained jobs {names}, not what method {self.method.name!r} asked for")
        per_job = (key(job.name) for job in trained for key in (wire.loss_key, wire.samples_key))
        check_metric_keys(values, who, [*records.TRAIN_METRICS, *per_job])
        updates, losses = [], {}
        for job in trained:
            count = values[wire.samples_key(job.name)]
            expected = client.num_samples if job.local_cluster is None else client.counts[job.local_cluster]
            if count != expected:
                raise ReplyError(f"{who}: trained job '{job.name}' on {count} samples, expected {expected}")
            losses[job.shared or f"personal:{job.name}"] = values[wire.loss_key(job.name)]
            if job.shared is None or job.part == "none":
                continue
            reference = {key: shapes[key] for key in part_of(self.state.initial, job.part)}
            arrays = get_arrays(reply.content, wire.adapter_key(job.name), who)
            adapter = check_adapter(arrays, reference, f"{who} adapter {job.name}")
            updates.append(Update(job.shared, adapter, float(count), who))
        return updates, losses

    # --- 7: evaluation ---

    def evaluate(self, limit: int = 0) -> dict:
        """Every client picks an adapter per test sample (``Method.serve``), generates and scores.

        ``limit`` > 0: a learning-curve check after a round: only the first ``limit`` personalized test samples
        per (client, task). Clients that fail are reported as missing; the others are scored.
        """
        cfg, run, method, state = self.cfg, self.run, self.method, self.state
        started = time.time()
        phase = "round check" if limit else "evaluation"
        if not limit:
            run.event("phase", name="evaluation", round=cfg["run.rounds"])
        active = [c for c in state.clients if c.node_id >= 0]
        tasks = membership.tasks_of(state.clients)
        train_table = membership.task_matrix(state.clients, tasks, len(state.centers))
        extra = method.serving_records(active, state.centers, train_table, tasks)
        subset = {"limit": limit, "sets": ["personalized"]} if limit else {}
        messages = []
        for client in active:
            adapters = {
                wire.adapter_key(key): to_record(arrays, cfg["train.adapter_dtype"])
                for key, arrays in state.shared.items()
            }
            content = RecordDict(
                {"config": config_record(cfg, adapter_keys=sorted(state.shared), **subset)}
                | adapters
                | extra.get(client.client_id, {})
            )
            messages.append(Message(content, client.node_id, records.EVALUATE, group_id="eval"))
        names = {c.node_id: f"client {c.client_id}" for c in active}
        replies, missing = exchange(self.grid, messages, run, phase, cfg["run.reply_timeout_s"], names)
        per_client = {}
        for reply in replies:
            client = next(c for c in active if c.node_id == reply.metadata.src_node_id)
            who = f"client {client.client_id}"
            try:
                values = get_metrics(reply.content, "metrics", who)
                records.check_evaluation(values, who, subset.get("sets", cfg.eval_sets), method.modes(cfg))
                per_client[client.client_id] = values
            except ReplyError as err:
                missing[who] = str(err)
                reject(run, phase, who, str(err))
        if not per_client:
            raise RunError(f"{phase}: no client sent a valid reply")
        return {
            "evaluation": summarize_evaluation(per_client, train_table, tasks) | {"missing_clients": missing},
            "evaluation_s": time.time() - started,
            "eval_bytes_down": sum(record_bytes(*m.content.array_records.values()) for m in messages),
            "eval_tokens": int(sum(v.get("generated_tokens", 0) for v in per_client.values())),
            # per client: a checksum of its answers (``answering.answers_digest``), to compare runs answer for answer
            "answers_crc32": {str(c): int(v.get("answers_crc32", 0)) for c, v in sorted(per_client.items())},
            "eval_model_loads_per_process": int(max(v.get("model_loads", 0) for v in per_client.values())),
        }

    def router_artifact(self) -> RouterArtifact:
        cfg, state = self.cfg, self.state
        return RouterArtifact(
            base_model=base_model_id(cfg["model.name"]), model_name=cfg["model.name"], lora=LoraSettings.of(cfg),
            global_centroids=state.centers,
            local_centroids={c.client_id: c.centroids for c in state.clients},
            cluster_map={c.client_id: c.assignment.tolist() for c in state.clients},
            adapters={int(key): arrays for key, arrays in state.shared.items()},
            precision=cfg["model.precision"],
            max_seq_len=cfg["model.max_seq_len"],
            embedding=discovery.EmbeddingSettings.of(cfg),
            radii=global_radii(state.clients, state.centers),
            fallback=cfg["routing.fallback"], fallback_factor=cfg["routing.fallback_factor"],
        )  # fmt: skip
