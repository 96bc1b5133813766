"""The round's wire formats, written and read here only: the job list and the per-job keys of a reply."""

from __future__ import annotations

from flwr.app import ConfigRecord

from fedrouter.errors import ReplyError
from fedrouter.federated.records import check_name
from fedrouter.methods import PARTS, Job

_FIELDS = ("names", "shared", "local_cluster", "personal", "part", "partner")


def adapter_key(job: str) -> str:
    """The array record that carries job ``job``'s adapter (down: the server's, up: the trained one)."""
    return f"adapter.{job}"


def loss_key(job: str) -> str:
    return f"loss.{job}"


def samples_key(job: str) -> str:
    return f"num_samples.{job}"


def jobs_record(jobs: list[Job]) -> ConfigRecord:
    """A round's jobs as parallel lists (configs carry plain values only)."""
    return ConfigRecord(
        {
            "names": [j.name for j in jobs],
            "shared": [j.shared or "" for j in jobs],
            "local_cluster": [-1 if j.local_cluster is None else int(j.local_cluster) for j in jobs],
            "personal": [j.personal or "" for j in jobs],
            "part": [j.part for j in jobs],
            "partner": [j.partner or "" for j in jobs],
        }
    )


def read_jobs(content, num_local: int, who: str) -> list[Job]:
    """The jobs a server sent, checked: names, local clusters this client has, known parts."""
    if "jobs" not in content.config_records:
        raise ReplyError(f"{who}: the server sent no 'jobs'")
    record = content.config_records["jobs"]
    columns = [record.get(key, []) for key in _FIELDS]
    if len({len(c) for c in columns}) != 1 or not isinstance(columns[0], list):
        raise ReplyError(f"{who}: malformed job list from the server")
    jobs = []
    for name, shared, local, personal, part, partner in zip(*columns, strict=True):
        if not isinstance(local, int) or not -1 <= local < num_local:
            raise ReplyError(f"{who}: asked to train unknown local cluster {local!r}")
        if part not in PARTS:
            raise ReplyError(f"{who}: unknown adapter part {part!r} (expected one of {PARTS})")
        for value in (shared, personal, partner):
            if value:
                check_name(value, f"{who} job field")
        jobs.append(
            Job(
                name=check_name(name, f"{who} job name"),
                shared=shared or None,
                local_cluster=None if local < 0 else local,
                personal=personal or None,
                part=part,
                partner=partner or None,
            )
        )
    return jobs
