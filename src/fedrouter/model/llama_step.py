"""A Llama model's decode step, prefill and hidden states in plain tensor operations: what transformers' forward
computes, without its per-call machinery.

A 16-row decode step of the embedded model spent about as long outside its matrix products and attention as in
them (``benchmarks/decode_step.py``'s profile): per layer, PEFT's mixed-batch bookkeeping and forward hooks, the
mask builder, the attention dispatcher and the module calls of 7 projections, 2 norms and the rotary embedding,
30 times per token. vLLM writes its own model code for the same reason. ``LlamaStep`` runs the same operations as
``LlamaDecoderLayer`` (norms in float32, the model's own rotary embedding, the softmax in float32 as transformers'
eager attention), reading the model's own weights and ``decoding.Batch``'s cache, and adds each row's adapter from
a ``batched_lora.Stack``. Attention reads each key/value head once for its group of query heads (one batched
product over the cache's contiguous buffers instead of transformers' copy of the cache per query head,
``repeat_kv``, or its CPU flash kernel, which is slow for one query). In bf16 on a CPU the products read their
weights in oneDNN's blocked layout (``packed_weights``). A step's logits are transformers' up to the order of
operations: within 1e-5 of its forward's in fp32 (``tests/test_llama_step.py``); in bf16 they move as much as
transformers' own eager attention moves them from its SDPA kernel, which changes some greedy answers from the
first near-tie they flip on (``benchmarks/decode_step.py`` counts them).

A prefill (``prefill``) and the hidden states embeddings read (``hidden_states``) have many positions per row,
where the per-call machinery weighed most on a prompt admitted alone (a server's request that joins a running
batch). They use transformers' own mask builder and the model's own attention function, so their numbers are
its forward's bit for bit (tested); only the machinery goes.

Only models whose type is ``llama`` (Llama 2 and 3, SmolLM, the tiny test model) take this path; other
architectures decode through transformers' forward (``supports``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from fedrouter.model.batched_lora import Stack
from fedrouter.model.loading import BaseModel

_PARTS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def supports(base: BaseModel) -> bool:
    """Whether ``base`` is a Llama model whose layers are transformers' own (not quantized, not replaced)."""
    from transformers.models.llama import modeling_llama as llama

    model = base.model.get_base_model()
    if model.config.model_type != "llama" or not isinstance(model, llama.LlamaForCausalLM):
        return False
    if getattr(model, "is_quantized", False):
        return False
    return all(
        type(layer) is llama.LlamaDecoderLayer
        and type(layer.self_attn) is llama.LlamaAttention
        and type(layer.mlp) is llama.LlamaMLP
        for layer in model.model.layers
    )


def _linear(module: nn.Module) -> nn.Linear:
    return module.base_layer if isinstance(module, LoraLayer) else module


_PACKED = ("llama_step", "packed weights")  # ``BaseModel.derived``: oneDNN's copies of the weights, once per model


def packed_weights(base: BaseModel) -> dict[nn.Linear, torch.Tensor]:
    """Every projection's weight (and the LM head's) in oneDNN's blocked layout, made once per model: what
    ``torch.compile`` makes of a frozen bf16 linear layer on a CPU (``mkldnn._reorder_linear_weight``, used by
    ``mkldnn._linear_pointwise``), without compiling.

    A decode step reads every weight once, from memory, for at most a few dozen rows. Packed, the embedded
    model's bf16 products ran 1.3-1.6x faster than ``F.linear`` (16 rows, every shape of the model, 30 weights
    in turn so that none stays cached; 2-core AVX-512 BF16 CPU) and gave bitwise the same result, as both run
    oneDNN's kernels. Only for bf16 on a CPU (in fp32 the packed product is not bitwise ``F.linear``'s); and
    only if the packed product equals ``F.linear``'s here (these are internal operators of torch: where one is
    missing or differs, the step keeps ``F.linear``). The copies take as much memory again as the weights packed.
    """
    if _PACKED in base.derived:
        return base.derived[_PACKED]
    packed: dict[nn.Linear, torch.Tensor] = {}
    model = base.model.get_base_model()
    if base.device.type == "cpu" and base.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
        linears = [_linear(layer.get_submodule(part)) for layer in model.model.layers for part in _PARTS]
        linears.append(model.lm_head)
        try:
            with torch.inference_mode():
                for linear in linears:
                    if type(linear) is nn.Linear and linear.weight.dtype == torch.bfloat16:
                        packed[linear] = torch.ops.mkldnn._reorder_linear_weight(linear.weight, 16)
                probe = torch.randn(3, linears[0].in_features, dtype=torch.bfloat16)
                if not torch.equal(_packed_product(packed[linears[0]], linears[0], probe), linears[0](probe)):
                    packed = {}
        except (AttributeError, RuntimeError, KeyError):  # an operator missing or refusing in this build of torch
            packed = {}
    base.derived[_PACKED] = packed
    return packed


def _packed_product(weight: torch.Tensor, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, linear.bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``LlamaRMSNorm``, operation for operation."""
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * hidden.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_pos_emb`` for one tensor."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


_FROZEN = ("llama_step", "frozen model")  # ``BaseModel.derived``: a LlamaStep without adapters, for hidden states


def frozen(base: BaseModel) -> LlamaStep | None:
    """The model's ``LlamaStep`` without adapters (for ``hidden_states``), made once; None where not ``supports``."""
    if _FROZEN not in base.derived:
        base.derived[_FROZEN] = LlamaStep(base) if supports(base) else None
    return base.derived[_FROZEN]


class LlamaStep:
    """``base``'s decode step and prefill with the adapters of ``stack``, and its frozen hidden states (no stack
    needed); ``supports(base)`` must hold."""

    def __init__(self, base: BaseModel, stack: Stack | None = None) -> None:
        model = base.model.get_base_model()
        config = self.config = model.config
        self.stack = stack
        self.packed = packed_weights(base)
        self.embed = model.model.embed_tokens
        self.rotary = model.model.rotary_emb
        self.norm = model.model.norm
        self.head = model.lm_head
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        first = model.model.layers[0].self_attn
        self.head_dim, self.scaling = int(first.head_dim), float(first.scaling)
        self.layers = [
            (layer, [layer.get_submodule(part) for part in _PARTS], layer.mlp.act_fn) for layer in model.model.layers
        ]

    @torch.inference_mode()
    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache, adapters: Sequence[str]
    ) -> torch.Tensor:
        """The next-token logits of every row (``[rows, vocabulary]``): ``tokens`` and ``positions`` are
        ``[rows, 1]``, ``mask`` ``[rows, columns]`` (1 at a row's tokens, the new one included), ``cache`` the
        batch's ``Cache`` of ``decoding._Layer`` (each layer's new keys and values are written into it)."""
        rows = tokens.shape[0]
        adds = self._adders(adapters)
        x = self.embed(tokens)
        dtype = x.dtype
        cos, sin = (t[:, None] for t in self.rotary(x, position_ids=positions))  # [rows, 1, 1, head_dim]
        masked = None  # the attention mask, once the first layer's cache has taken the new token (and perhaps moved)
        groups = self.heads // self.kv_heads
        for index, (layer, (q, k, v, o, gate, up, down), act) in enumerate(self.layers):
            h = _norm(x, layer.input_layernorm)
            query = self._project(adds, q, h).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            key = self._project(adds, k, h).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            value = self._project(adds, v, h).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            layer_cache = cache.layers[index]
            layer_cache.update(_rotate(key, cos, sin), value)
            keys, values = layer_cache.whole()  # [rows, kv heads, column capacity, d]
            if masked is None:
                masked = self._mask(mask, layer_cache, dtype)
            elif keys.shape[2] != masked.shape[-1] or layer_cache.start != cache.layers[0].start:
                raise RuntimeError(f"the batch's cache layers {index} and 0 differ in their columns")
            # Query head j reads key/value head j // groups (transformers' repeat_kv), so a key/value head's group
            # of query heads is one [groups, d] block of the rotated queries.
            grouped = _rotate(query, cos, sin).reshape(rows, self.kv_heads, groups, self.head_dim)
            attended = self._attend(grouped, keys, values, masked).reshape(rows, 1, self.heads * self.head_dim)
            x = x + self._project(adds, o, attended)
            h = _norm(x, layer.post_attention_layernorm)
            x = x + self._project(adds, down, act(self._project(adds, gate, h)) * self._project(adds, up, h))
        return self._product(self.head, _norm(x, self.norm)[:, -1])

    def _attend(
        self, grouped: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, masked: torch.Tensor
    ) -> torch.Tensor:
        """Each key/value head's group of queries (``[rows, kv heads, groups, d]``) attended over its whole cache
        buffer (``[rows, kv heads, capacity, d]``), as transformers' eager attention computes it."""
        scores = torch.matmul(grouped, keys.transpose(2, 3)) * self.scaling + masked
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(grouped.dtype)
        return torch.matmul(weights, values)

    @torch.inference_mode()
    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache, adapters: Sequence[str]
    ) -> torch.Tensor:
        """The next-token logits after each row's prompt (``[rows, vocabulary]``), computed as transformers'
        forward computes them: ``ids`` and ``positions`` ``[rows, width]`` (left-padded), ``mask`` ``[rows, columns]``
        (the prefix already in ``cache``, then the rows' own), ``cache`` a ``DynamicCache`` that takes each layer's
        keys and values. The attention mask comes from transformers' own builder and the attention from the model's
        own attention function (SDPA by default), so the result is its forward's, bit for bit where the products
        are (``tests/test_llama_step.py``); what goes is its per-call machinery and PEFT's."""
        (x,) = deque(self._through_layers(ids, mask, positions, cache, self._adders(adapters)), maxlen=1)  # the last
        return self._product(self.head, _norm(x[:, -1], self.norm))

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """transformers' ``hidden_states[layer]`` of the frozen model (no adapter, no cache) for each of ``layers``
        (0: the token embeddings; the model's number of layers: the last, after the final norm), running no decoder
        layer above the deepest asked: ``ids`` and ``mask`` ``[rows, width]``, right-padded. The same operations as
        ``prefill``, so the same numbers as the model's forward, bit for bit."""
        last, deepest = len(self.layers), max(layers)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]  # as the forward numbers an uncached input
        found: dict[int, torch.Tensor] = {}
        for depth, x in enumerate(self._through_layers(ids, mask, positions, None, {})):
            if depth in layers and depth < last:
                found[depth] = x
            if depth == deepest:
                break  # the layers above it never run
        if last in layers:
            found[last] = _norm(x, self.norm)
        return found

    def _through_layers(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache | None, adds: dict
    ) -> Iterator[torch.Tensor]:
        """The token embeddings, then the hidden states after each decoder layer in turn, as transformers' forward
        computes them (its mask builder, the model's attention function); ``cache`` (or None) takes each layer's
        keys and values."""
        rows, width = ids.shape
        x = self.embed(ids)
        yield x
        causal = create_causal_mask(
            config=self.config, inputs_embeds=x, attention_mask=mask, cache=cache, position_ids=positions
        )
        cos, sin = (t[:, None] for t in self.rotary(x, position_ids=positions))  # [rows, 1, width, head_dim]
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        for index, (layer, (q, k, v, o, gate, up, down), act) in enumerate(self.layers):
            h = _norm(x, layer.input_layernorm)
            query = self._project(adds, q, h).view(rows, width, self.heads, self.head_dim).transpose(1, 2)
            key = self._project(adds, k, h).view(rows, width, self.kv_heads, self.head_dim).transpose(1, 2)
            value = self._project(adds, v, h).view(rows, width, self.kv_heads, self.head_dim).transpose(1, 2)
            key = _rotate(key, cos, sin)
            keys, values = (key, value) if cache is None else cache.update(key, value, index)
            attended, _ = attend(layer.self_attn, _rotate(query, cos, sin), keys, values, causal, scaling=self.scaling)
            x = x + self._project(adds, o, attended.reshape(rows, width, -1).contiguous())
            h = _norm(x, layer.post_attention_layernorm)
            x = x + self._project(adds, down, act(self._project(adds, gate, h)) * self._project(adds, up, h))
            yield x

    def _project(self, adds: dict, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """A projection of the frozen model plus each row's adapter where the stack has one for it."""
        out = self._product(_linear(module), h)
        add = adds.get(module)
        return out if add is None else out + add(h).to(out.dtype)

    def _adders(self, adapters: Sequence[str]) -> dict:
        if self.stack is None:
            raise ValueError("this LlamaStep has no adapter stack: it computes the frozen model's hidden states only")
        return self.stack.adders(adapters)

    def _product(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed.get(linear)
        return linear(x) if packed is None else _packed_product(packed, linear, x)

    @staticmethod
    def _mask(mask: torch.Tensor, layer, dtype: torch.dtype) -> torch.Tensor:
        """The additive attention mask over a cache layer's whole buffer (``_Layer.whole``), ``[rows, 1, 1,
        capacity]``: 0 at each row's tokens (``mask``, the layer's columns ``start:length``), the dtype's lowest
        number elsewhere (transformers' eager mask)."""
        lowest = torch.finfo(dtype).min
        masked = torch.full((mask.shape[0], layer.whole()[0].shape[2]), lowest, dtype=dtype, device=mask.device)
        columns = masked[:, layer.start : layer.length]
        columns.zero_()
        columns.masked_fill_(mask == 0, lowest)
        return masked[:, None, None, :]
