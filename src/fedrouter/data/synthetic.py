"""A small multi-task dataset generated from a seed, so the demo needs nothing outside the repo.

Four clearly different tasks: a short label, a copied span, and two generated texts:

- ``sentiment``: a product review -> ``positive`` / ``negative``
- ``extraction``: a short message -> the email address it mentions
- ``sorting``: a list of words -> the words in alphabetical order
- ``data2text``: a record of attributes -> one sentence describing it
"""

from __future__ import annotations

import random

from fedrouter.data.samples import Sample

TASKS = ("sentiment", "extraction", "sorting", "data2text")

_ITEMS = ["phone", "laptop", "blender", "jacket", "headset", "camera", "chair", "kettle", "backpack", "lamp"]
_GOOD = ["excellent", "reliable", "wonderful", "comfortable", "sturdy", "great", "fantastic", "superb"]
_BAD = ["terrible", "flimsy", "awful", "disappointing", "noisy", "useless", "broken", "poor"]
_GOOD_TAIL = ["I would buy it again.", "Highly recommended.", "It works perfectly.", "Worth every penny."]
_BAD_TAIL = ["I want a refund.", "Avoid it.", "It stopped working in a week.", "A waste of money."]
_WORDS = [
    "apple", "river", "candle", "forest", "guitar", "island", "jungle", "kitten", "lemon", "mirror",
    "needle", "orange", "pencil", "rocket", "saddle", "tomato", "violin", "window", "yogurt", "zebra",
    "anchor", "bridge", "cactus", "dragon", "engine", "falcon", "garden", "hammer", "marble", "velvet",
]  # fmt: skip
_NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dalia",
    "Emeka",
    "Farah",
    "Goran",
    "Hana",
    "Ivan",
    "Julia",
    "Kofi",
    "Lena",
]
_CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Seoul", "Cairo", "Quito", "Perth", "Porto", "Delhi"]
_JOBS = ["teacher", "pilot", "chef", "nurse", "painter", "farmer", "lawyer", "baker", "engineer", "writer"]


def _sentiment(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    item = rng.choice(_ITEMS)
    adj = rng.choice(_GOOD if positive else _BAD)
    tail = rng.choice(_GOOD_TAIL if positive else _BAD_TAIL)
    review = f"The {item} is {adj}. {tail}"
    return f"Review: {review}\nIs this review positive or negative?", "positive" if positive else "negative"


_DOMAINS = ["mail.com", "post.org", "inbox.net", "example.io"]
_ASKS = ["please send", "could you check", "I still need", "we have to update", "remember to sign", "can you share"]
_THINGS = ["the invoice", "the draft", "the schedule", "the contract", "the photos", "the budget", "the slides"]
_WHEN = ["before Friday", "by tomorrow", "this week", "after lunch", "next Monday", "today"]


def _extraction(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(_NAMES).lower()
    email = f"{name}.{rng.randint(1, 999)}@{rng.choice(_DOMAINS)}"
    message = (
        f"Hi, {rng.choice(_ASKS)} {rng.choice(_THINGS)} {rng.choice(_WHEN)}. Write to {email} if anything is unclear."
    )
    return f"Extract the email address from this message: {message}", email


def _sorting(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return f"Sort these words in alphabetical order: {', '.join(words)}", ", ".join(sorted(words))


def _data2text(rng: random.Random) -> tuple[str, str]:
    name, city, job = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_JOBS)
    age = rng.randint(21, 70)
    record = f"name[{name}] city[{city}] job[{job}] age[{age}]"
    article = "an" if job[0] in "aeiou" else "a"
    return (
        f"Describe this record in one sentence: {record}",
        f"{name} is {article} {job} from {city} who is {age} years old.",
    )


_GENERATORS = {
    "sentiment": _sentiment,
    "extraction": _extraction,
    "sorting": _sorting,
    "data2text": _data2text,
}


def generate(per_task: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, test): ``per_task`` training and ``per_task // 2`` test samples of every task.

    No instruction appears twice, so train and test never overlap.
    """
    train: list[Sample] = []
    test: list[Sample] = []
    for task_index, task in enumerate(TASKS):
        rng = random.Random(f"fedrouter-synthetic-{seed}-{task_index}")
        seen: set[str] = set()
        wanted = per_task + per_task // 2
        for _ in range(wanted * 50):
            if len(seen) == wanted:
                break
            instruction, response = _GENERATORS[task](rng)
            if instruction in seen:
                continue
            seen.add(instruction)
            split, target = ("train", train) if len(seen) <= per_task else ("test", test)
            target.append(Sample(f"{task}-{split}{len(seen) - 1}", instruction, response, task, (response,)))
    return train, test
