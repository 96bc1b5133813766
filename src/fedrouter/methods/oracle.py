"""Oracle router: FedRouter with perfect clusters (the true task labels) and routing by the true label.

An upper bound for FedRouter's clustering and routing: what the task-centric adapters reach when no sample is
mis-clustered or mis-routed. It uses labels a real deployment does not have.
"""

from __future__ import annotations

from fedrouter.methods.fedrouter import FedRouter


class Oracle(FedRouter):
    name = "oracle"
    clustering = "task"
    serving = "task"
    paper = "upper bound (not in a paper)"
