"""A sample: one prompt (an instruction, or a chat's last user turn after earlier turns) and its answer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fedrouter.algorithm.metrics import NO_TASK
from fedrouter.errors import DataError

__all__ = ["NO_TASK", "ROLES", "TASK_NAME", "DataError", "Sample"]

TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Sample:
    """One prompt/answer pair. ``task`` is the true label, used only for splitting and scoring.

    ``instruction`` is what the user asked last: the whole prompt of single-turn data, a chat's last user turn.
    It is what clustering and routing embed (as the server does for a chat). ``context`` holds the turns before
    it, as (role, content) pairs: a system prompt, earlier user and assistant turns. ``response`` is the answer
    trained on and scored; a chat's earlier assistant turns are trained on too.
    """

    id: str
    instruction: str
    response: str
    task: str = NO_TASK
    references: tuple[str, ...] = field(default_factory=tuple)
    context: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    client: str | None = None  # the data's own client label (data.partition = 'column')

    @property
    def golds(self) -> tuple[str, ...]:
        """All gold answers (the response first)."""
        return self.references or (self.response,)

    @property
    def prompt(self) -> str | list[dict[str, str]]:
        """What the model is asked: the instruction, or the chat up to and including the last user turn."""
        if not self.context:
            return self.instruction
        return [*({"role": r, "content": c} for r, c in self.context), {"role": "user", "content": self.instruction}]
