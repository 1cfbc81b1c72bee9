"""Reorder a mixed layer's heads so that its full KV heads come first and its streaming ones last.

A layer where only some KV heads stream has to run its two head groups apart (different caches, different
attention). With the heads in their original order that costs gathers and scatters at every step: the full
group's queries, keys and values picked out with ``index_select`` and the outputs put back with ``index_put``.
Permuting the heads once, in the weights, makes each group a contiguous range, so the runtime takes views
instead (``narrow``) and joins the outputs with one ``cat``.

The permutation is exact: a KV head's rows of ``k_proj``/``v_proj``, its query heads' rows of ``q_proj`` (the
GQA group travels with its KV head) and the matching columns of ``o_proj`` move together, and every per-head
operation (RoPE, per-head norms such as Qwen3's ``q_norm``/``k_norm``) acts on each head alike. Only the order in
which ``o_proj`` sums the heads changes (float rounding, ~1e-7 relative).

Supported: attention modules with separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` linear layers (Llama,
Mistral, Qwen2/3, Gemma, ...). Others (GPT-NeoX's fused ``query_key_value``) keep their order and take the
gather path.
"""

from __future__ import annotations

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def grouped_kv_order(kv_mask) -> list[int]:
    """New order of the KV heads: full ones (False) first, then streaming ones (True), each in original order.
    ``order[i]`` = the original index of the head that moves to slot ``i``."""
    mask = [bool(x) for x in kv_mask]
    return [i for i, s in enumerate(mask) if not s] + [i for i, s in enumerate(mask) if s]


def query_order(kv_order: list[int], group: int) -> list[int]:
    """The query heads' order that follows ``kv_order`` (query head ``h`` belongs to KV head ``h // group``)."""
    return [kv * group + j for kv in kv_order for j in range(group)]


def inverse(order: list[int]) -> list[int]:
    """The permutation that undoes ``order``."""
    inv = [0] * len(order)
    for new, old in enumerate(order):
        inv[old] = new
    return inv


def supports_reordering(module: torch.nn.Module) -> bool:
    """Whether ``module`` has the four separate projections this module permutes."""
    return all(isinstance(getattr(module, name, None), torch.nn.Linear) for name in PROJECTIONS)


@torch.no_grad()
def permute_heads(module: torch.nn.Module, kv_order: list[int], *, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> None:
    """Permute ``module``'s heads in place so that new KV head ``i`` is old KV head ``kv_order[i]``.

    ``q_proj.weight`` ``[num_heads * head_dim, hidden]`` and ``k_proj``/``v_proj`` ``[num_kv_heads * head_dim,
    hidden]`` are permuted by rows (biases alike), ``o_proj.weight`` ``[hidden, num_heads * head_dim]`` by
    columns.
    """
    if sorted(kv_order) != list(range(num_kv_heads)):
        raise ValueError(f"kv_order {kv_order} is not a permutation of {num_kv_heads} KV heads")
    q_order = query_order(kv_order, num_heads // num_kv_heads)

    def rows(linear: torch.nn.Linear, order: list[int]) -> None:
        index = torch.tensor(order, device=linear.weight.device)
        w = linear.weight.view(len(order), head_dim, -1)
        linear.weight.copy_(w.index_select(0, index).reshape_as(linear.weight))
        if linear.bias is not None:
            b = linear.bias.view(len(order), head_dim)
            linear.bias.copy_(b.index_select(0, index).reshape_as(linear.bias))

    rows(module.q_proj, q_order)
    rows(module.k_proj, kv_order)
    rows(module.v_proj, kv_order)
    o = module.o_proj.weight
    index = torch.tensor(q_order, device=o.device)
    o.copy_(o.view(o.shape[0], num_heads, head_dim).index_select(1, index).reshape_as(o))


__all__ = ["grouped_kv_order", "query_order", "inverse", "supports_reordering", "permute_heads", "PROJECTIONS"]
