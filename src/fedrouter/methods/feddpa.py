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
- Instance weights are rounded to ``WEIGHT_STEP`` so that samples with equal weights share a generation batch
  (a change of at most 0.025 in alpha).
- Their batched inference path (`batched=True`, the default) generates every answer before any instance weight
  is set, so with `--auto` its answers come from the global adapter alone; we follow their per-sample path,
  which is what the paper describes.
"""

from __future__ import annotations

from fedrouter.methods.base import Arrays, ClientClusters, Job, Method


class FedDPA(Method):
    name = "feddpa"
    serving = "mix"
    paper = "Yang et al. 2024"
    personal_state = True

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        return {"global": dict(initial)}

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        train_global = Job(name="global", shared="global")
        if round_index == 0:
            return [train_global]
        # "global" as the partner: not trained yet this round, not personal: the adapter the server sent.
        return [Job(name="local", personal="local", part="none", partner="global"), train_global]


# Test-time weighting, as in the authors' code: 5 reference instances per test sample, the global adapter's weight
# capped at 0.5. Weights are rounded to WEIGHT_STEP so samples with equal weights share a generation batch.
INSTANCES = 5
MAX_WEIGHT = 0.5
WEIGHT_STEP = 0.05
