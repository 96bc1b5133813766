"""Talking to the clients over a Flower ``Grid``: push messages, pull replies, notice time-outs and lost nodes."""

from __future__ import annotations

import logging
import time

from flwr.app import Message
from flwr.serverapp import Grid

from fedrouter.config import Config
from fedrouter.errors import ConfigError, RunError
from fedrouter.runlog import RunFolder

log = logging.getLogger("fedrouter")

NODE_CHECK_S = 5.0  # how often a phase checks that the nodes it waits for are still connected
# How long the set of connected nodes must stay the same before ``fit_to_federation`` counts it: Flower's
# simulation registers every SuperNode at once, a deployment's SuperNodes connect as they start.
SETTLE_S = {"simulation": 1.0, "deployment": 10.0}


def reject(run: RunFolder, phase: str, who: str, reason: str) -> None:
    """A reply the server refuses: logged and kept in the event stream; the run goes on without it."""
    log.warning("%s: rejected %s: %s", phase, who, reason)
    run.event("rejected", phase=phase, who=who, reason=reason)


def exchange(
    grid: Grid, messages: list[Message], run: RunFolder, phase: str, timeout: float, names: dict[int, str]
) -> tuple[list[Message], dict[str, str]]:
    """Push messages and pull replies as they arrive (one progress event each).

    Returns the replies without error, in the order the messages were sent, and for every client that
    failed (an error reply: a crash or a lost node; or no reply within ``timeout``) why, keyed by its name.
    """
    targets = [message.metadata.dst_node_id for message in messages]
    ids = list(grid.push_messages(messages))
    node_of = dict(zip(ids, targets, strict=True))
    pending = set(ids)
    replies: list[Message] = []
    failed: dict[str, str] = {}
    deadline = time.time() + timeout
    next_check = time.time() + NODE_CHECK_S
    while pending and time.time() < deadline:
        if time.time() >= next_check:  # a node that stopped sending heartbeats will not reply: stop waiting
            online = set(grid.get_node_ids())
            for message_id in [m for m in pending if node_of[m] not in online]:
                pending.discard(message_id)
                node = node_of[message_id]
                failed[names.get(node, f"node {node}")] = "disconnected (Flower lists the node as offline)"
            next_check = time.time() + NODE_CHECK_S
        for reply in grid.pull_messages(list(pending)):
            message_id = reply.metadata.reply_to_message_id
            if message_id not in pending:
                continue
            pending.discard(message_id)
            node = node_of[message_id]
            if reply.has_error():
                failed[names.get(node, f"node {node}")] = f"failed: {_short(reply.error.reason)}"
            else:
                replies.append(reply)
            run.event("reply", phase=phase, done=len(replies) + len(failed), total=len(messages))
        if pending:
            time.sleep(0.1)
    for message_id in pending:
        node = node_of[message_id]
        failed[names.get(node, f"node {node}")] = f"no reply within {timeout:.0f}s"
    for who, reason in failed.items():
        reject(run, phase, who, reason)
    order = {node: i for i, node in enumerate(targets)}
    return sorted(replies, key=lambda r: order.get(r.metadata.src_node_id, 0)), failed


def _short(reason: str) -> str:
    """Flower's error reason can carry a whole remote traceback: keep the message at its end."""
    return reason.rsplit("Message:", 1)[-1].strip(" '>\n")[-300:]


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, run: RunFolder) -> list[int]:
    """The first ``wanted`` connected nodes (0: every connected one), waiting up to ``timeout`` seconds."""
    deadline = time.time() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes[:wanted] if wanted else nodes
        if time.time() > deadline:
            raise RunError(f"only {len(nodes)} of {wanted} clients connected within {timeout:.0f}s")
        run.event("waiting", connected=len(nodes), wanted=wanted)
        time.sleep(1.0)


def _is_simulation(grid: Grid) -> bool:
    """Flower's simulation runtime (its in-memory Grid) has a fixed set of SuperNodes, all registered at once."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # another Flower version: treat the federation as a deployment, which may still grow
        return False
    return isinstance(grid, InMemoryGrid)


def settled_nodes(grid: Grid, settle_s: float, timeout: float) -> list[int]:
    """The connected nodes, once at least one is and none has connected or left for ``settle_s`` seconds."""
    deadline = time.time() + timeout
    nodes, since = sorted(grid.get_node_ids()), time.time()
    while not nodes or time.time() - since < settle_s:
        if time.time() > deadline:
            if not nodes:
                raise RunError(f"no SuperNode connected within {timeout:.0f}s ('run.reply_timeout_s')")
            break  # nodes keep coming and going: count the ones there now
        time.sleep(0.2)
        now = sorted(grid.get_node_ids())
        if now != nodes:
            nodes, since = now, time.time()
    return nodes


def fit_to_federation(grid: Grid, cfg: Config) -> Config:
    """Under ``flwr run`` the federation exists before the run: size the run to it, or refuse a mismatch at once.

    ``data.num_clients = 0`` becomes the number of SuperNodes once their set stops changing (``SETTLE_S``). In
    Flower's simulation every SuperNode holds one of ``num-partitions`` partitions, and ``num-partitions`` is the
    number of SuperNodes, which never changes during the run: so a set ``data.num_clients`` that differs is an
    error now, not a wait for nodes that will never come (fewer) or a node without data (more). A deployment's
    nodes may still be connecting: with a set number, ``wait_for_nodes`` waits for them as before.
    """
    wanted = cfg["data.num_clients"]
    kind = "simulation" if _is_simulation(grid) else "deployment"
    if wanted and kind == "deployment":
        return cfg
    count = len(settled_nodes(grid, SETTLE_S[kind], cfg["run.reply_timeout_s"]))
    if wanted == 0:
        log.info("data.num_clients = 0: %d clients, one per SuperNode of the %s", count, kind)
        cfg = cfg.replace(data__num_clients=count)
    elif count != wanted:  # a simulation (a deployment with a set number returned above)
        raise ConfigError(
            f"setting 'data.num_clients' = {wanted}, but the simulation has {count} SuperNodes (one client each): "
            f"set data.num_clients = {count}, or 0 for as many clients as the federation has (or run "
            f'with --federation-config "num-supernodes={wanted}")'
        )
    if cfg["run.min_clients"] > cfg["data.num_clients"]:
        raise ConfigError(
            f"setting 'run.min_clients' = {cfg['run.min_clients']} waits for more clients than the "
            f"{kind}'s {cfg['data.num_clients']}: lower it (0: every client)"
        )
    return cfg
