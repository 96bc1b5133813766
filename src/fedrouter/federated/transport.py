"""Talking to the clients over a Flower ``Grid``: push messages, pull replies, notice time-outs and lost nodes."""

from __future__ import annotations

import logging
import time

from flwr.app import Message
from flwr.serverapp import Grid

from fedrouter.errors import RunError
from fedrouter.runlog import RunFolder

log = logging.getLogger("fedrouter")

NODE_CHECK_S = 5.0  # how often a phase checks that the nodes it waits for are still connected


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
