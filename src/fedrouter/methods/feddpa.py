"""FedDPA: a global adapter (FedAvg) plus a personal local adapter, mixed per test instance.

Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models" (NeurIPS 2024), the iterative variant
FedDPA-T. What follows the authors' code (`Lydia-yang/FedDPA`: `code/main.py` with `--local_model True`,
`code/fed_utils/client.py`, their patched `peft/tuners/lora/layer.py`, and `code/GlobalModel_generated.py`):

- Round 1 trains the global adapter only (their `local_model and epoch > 0`).
- From round 2 a client first trains its local adapter with the global adapter it received mixed in, frozen:
  output = base + 0.5 * local + 0.5 * global (their `set_local(['default'], [a, 1 - a])` with `local_weight`
  a = 0.5; the frozen adapter's output is detached). The local adapter starts fresh in round 2 and from the
  client's previous one afterwards. Then the client trains the received global adapter *alone*, and only that is
  uploaded and averaged (FedAvg by sample count).
- At test time the instance weight is alpha = 0.5 * the mean cosine similarity between the test input's
  embedding and those of 5 of the client's training inputs drawn at random for that sample, and the answer
  uses ``alpha * global + (1 - alpha) * local`` (their `set_local(['local'], [weight, 1 - weight])` with the
  global adapter active: the instance weight scales the global adapter). The embedding is the last layer's
  hidden state at the last token of the formatted prompt, computed with the local adapter active (their
  `get_weight`, `emb_type='last'`).

Where ours differs, and why:

- Training is ``train.local_steps`` optimizer steps per adapter (theirs: epochs of HF Trainer), like every other
  method here, so methods get equal compute.
- Instance weights are rounded to ``WEIGHT_STEP`` so that samples with equal weights share an adapter slot
  (a change of at most 0.025 in alpha). The weighted pair is one adapter of twice the rank (``lora.combine``),
  so it decodes in the same loop as every other method's adapters.
- Their batched inference path (`batched=True`, the default) generates every answer before any instance weight
  is set, so with `--auto` its answers come from the global adapter alone; we follow their per-sample path,
  which is what the paper describes.
"""

from __future__ import annotations

import numpy as np

from fedrouter.arrays import Arrays
from fedrouter.methods.base import ClientClusters, Job, Method, Serving, derived_seed
from fedrouter.methods.registry import register

# Test-time weighting, as in the authors' code: 5 reference instances per test sample, the global adapter's weight
# capped at 0.5. Weights are rounded to WEIGHT_STEP so samples with equal weights share an adapter slot.
INSTANCES = 5
MAX_WEIGHT = 0.5
WEIGHT_STEP = 0.05


@register
class FedDPA(Method):
    name = "feddpa"
    title = "FedDPA"
    paper = "Yang et al. 2024"
    order = 3
    client_personalized = True
    personal_state = True

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        train_global = Job(name="global", shared="global")
        if round_index == 0:
            return [train_global]
        # "global" as the partner: not trained yet this round, not personal: the adapter the server sent.
        return [Job(name="local", personal="local", part="none", partner="global"), train_global]

    def serve(self, serving: Serving, samples, modes: list[str]) -> dict[str, list[tuple]]:
        weights = instance_weights(serving, samples)
        return {mode: [("mix", float(w)) for w in weights] for mode in modes}

    def adapter(self, serving: Serving, key: tuple) -> Arrays:
        """alpha * global + (1 - alpha) * local, as the authors weight them: one adapter of twice the rank."""
        from fedrouter.model import lora

        return lora.combine([(key[1], serving.shared["global"]), (1.0 - key[1], serving.personal)])


def instance_weights(serving: Serving, samples) -> np.ndarray:
    """The global adapter's weight for each sample: 0.5 x the mean cosine similarity of the sample's instance
    embedding to those of 5 training inputs drawn for it (a generator seeded by run seed and client: a sample's
    draw depends on its position, never on its task)."""
    from fedrouter.model import compute, lora

    cfg, train_inputs = serving.cfg, serving.train_inputs
    rng = np.random.default_rng(derived_seed(cfg["run.seed"], serving.client))
    size = min(INSTANCES, len(train_inputs))
    picks = [rng.choice(len(train_inputs), size=size, replace=False) for _ in samples]
    needed = sorted({int(i) for pick in picks for i in pick})
    lora.set_adapter(serving.base, serving.personal)  # the authors embed with the local adapter loaded
    states = compute.last_token_states(
        serving.base,
        [s.prompt for s in samples] + [train_inputs[i] for i in needed],
        batch_size=cfg["eval.batch_size"],
        max_len=cfg["model.max_seq_len"],
    )
    states /= np.maximum(np.linalg.norm(states, axis=1, keepdims=True), 1e-12)
    tests, references = states[: len(samples)], states[len(samples) :]
    row = {i: k for k, i in enumerate(needed)}
    similarity = np.array(
        [
            float((references[[row[int(i)] for i in pick]] @ test).mean())
            for test, pick in zip(tests, picks, strict=True)
        ]
    )
    return np.round(MAX_WEIGHT * similarity / WEIGHT_STEP) * WEIGHT_STEP
