"""A causal depthwise convolution, a chunked gated delta rule and a chunked Mamba2 scan over packed segments, in
plain torch.

They compute what transformers' torch paths (and flash-linear-attention's kernels) compute for one sequence, for many
sequences of different lengths laid end to end, each from its own initial state: the convolution of a segment sees
its ``K - 1`` history inputs (a branch: its prefix's last inputs; otherwise zeros), the scan of a segment starts from
zero or from its prefix's final state. The math is the published chunked form of the gated delta rule (Yang et al.,
"Gated Delta Networks", 2024): within a chunk a unit lower-triangular system condenses the delta-rule updates, across
chunks a recurrence carries the ``[d_k, d_v]`` state. The Mamba2 scan is the published state space duality form
(Dao & Gu, "Transformers are SSMs", 2024): within a chunk a decay-weighted ``C B^T`` product, across chunks the
``[d_state, head_dim]`` state. Only the kernels' API is shared with transformers, not code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from trl_prefix_share.core.mixers.ragged_plan import ChunkSchedule, ConvGather

#: The precision of the scan. transformers' torch path and fla's kernels compute in float32 whatever the model's
#: dtype; the float64 equivalence tests raise this together with transformers' own kernel.
COMPUTE_DTYPE = torch.float32
#: The epsilon of the query / key L2 normalisation, as transformers' and fla's kernels use.
L2_EPS = 1e-6


def _with_zero_row(tokens: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` -> ``[N + 1, ...]``: index ``N`` reads zeros (history before a segment, slots past its end)."""
    return torch.cat([tokens, tokens.new_zeros((1, *tokens.shape[1:]))])


def ragged_causal_conv(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    gather: ConvGather,
) -> torch.Tensor:
    """``inputs [1, C, N]`` (all packed tokens) -> ``[1, C, N]``, each segment convolved with its own history.

    ``weight [C, 1, K]`` depthwise. One valid convolution over the gathered sequence; the output is cast back to the
    inputs' dtype after the activation, as transformers' helper does."""
    channels = inputs.size(1)
    source = _with_zero_row(inputs[0].transpose(0, 1))[gather.source]  # [Z, C]
    convolved = F.conv1d(source.transpose(0, 1)[None].to(weight.dtype), weight, bias, groups=channels)
    out = _with_zero_row(convolved[0].transpose(0, 1))[gather.output]  # [N, C]
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.transpose(0, 1)[None].to(inputs.dtype)


def _l2_normalised(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2_EPS)


def _chunked(tokens: torch.Tensor, schedule: ChunkSchedule) -> torch.Tensor:
    """``[N, H, ...]`` -> ``[chunks, H, chunk, ...]`` (zeros in the slots past a segment's end)."""
    gathered = _with_zero_row(tokens)[schedule.slots]  # [chunks, chunk, H, ...]
    return gathered.transpose(1, 2)


def ragged_gated_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    schedule: ChunkSchedule,
    use_qk_l2norm: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """The gated delta rule's outputs ``[1, N, H_v, d_v]`` for ``query, key [1, N, H_k, d_k]``, ``value [1, N, H_v,
    d_v]``, log decays ``g`` and write strengths ``beta`` ``[1, N, H_v]``, every segment of ``schedule`` scanned from
    its own initial state. Key heads serve ``H_v / H_k`` consecutive value heads each; ``scale`` defaults to
    ``d_k ** -0.5``; tokens in no segment get zeros.

    ``g`` is ``[1, N, H_v]`` (one decay per head: Qwen3.5, Qwen3-Next) or ``[1, N, H_v, d_k]``: Kimi delta attention,
    one decay per key channel (the state's row ``d`` decays by ``exp(g[..., d])``), as Kimi-Linear's torch path and
    fla's ``chunk_kda`` compute it."""
    return _delta_rule(query, key, value, g, beta, schedule, use_qk_l2norm, scale)


def _delta_rule(query, key, value, g, beta, schedule: ChunkSchedule, use_qk_l2norm: bool, scale) -> torch.Tensor:
    """The chunked delta rule over ragged segments; ``g [1, N, H]`` (one decay per head) or ``[1, N, H, d_k]`` (one
    per key channel)."""
    out_dtype = query.dtype
    value_heads = value.size(2)
    if key.size(2) != value_heads:
        repeat = value_heads // key.size(2)
        query, key = query.repeat_interleave(repeat, dim=2), key.repeat_interleave(repeat, dim=2)
    query, key, value, g, beta = (x[0].to(COMPUTE_DTYPE) for x in (query, key, value, g, beta))
    if use_qk_l2norm:
        query, key = _l2_normalised(query), _l2_normalised(key)
    query = query * (query.size(-1) ** -0.5 if scale is None else scale)
    query, key, value = (_chunked(x, schedule) for x in (query, key, value))  # [chunks, H, C, d]
    g, beta = (_chunked(x, schedule) for x in (g, beta))  # [chunks, H, C] or [chunks, H, C, d_k]; [chunks, H, C]

    chunk = query.size(2)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).tril()
    decay = g.cumsum(dim=2)  # log decay from the chunk's start to each slot (constant past a segment's end)
    key_beta = key * beta[..., None]
    if decay.dim() == 3:  # one decay per head
        pair_decay = (decay[..., :, None] - decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        # (I + strictly lower part of A) X = B, with A = (beta k) k^T weighted by the decay between the two slots.
        system = (key_beta @ key.transpose(-1, -2)) * pair_decay
        within = (query @ key.transpose(-1, -2)) * pair_decay
        decay = decay[..., None]  # broadcast over the key channels below
    else:  # one decay per key channel: the pair weights sum over channels
        system, within = _channel_weighted_pairs(query, key, key_beta, decay, causal)
    corrected_values = torch.linalg.solve_triangular(system, value * beta[..., None], upper=False, unitriangular=True)
    state_reads = torch.linalg.solve_triangular(system, key_beta * decay.exp(), upper=False, unitriangular=True)
    query_decayed = query * decay.exp()
    key_to_end = key * (decay[..., -1:, :] - decay).exp()
    chunk_decay = decay[..., -1, :].exp()[..., None]  # [chunks, H, d_k or 1, 1]: the state's rows

    level_sizes = schedule.level_sizes
    heads, d_k, d_v = query.size(1), query.size(-1), value.size(-1)
    outputs = []
    final_states = None
    for level, steps in enumerate(schedule.steps):  # tree depths: roots from zero, then each from its parents
        if level_sizes[level] == 0:
            continue
        if level == 0:
            state = query.new_zeros((level_sizes[0], heads, d_k, d_v))
        else:
            state = final_states[schedule.parent_rank[level]]
        for first, active in steps:
            rows = slice(first, first + active)
            current = state[:active]
            fresh = corrected_values[rows] - state_reads[rows] @ current
            outputs.append(query_decayed[rows] @ current + within[rows] @ fresh)
            advanced = current * chunk_decay[rows] + key_to_end[rows].transpose(-1, -2) @ fresh
            state = advanced if active == state.size(0) else torch.cat([advanced, state[active:]])
        final_states = state
    if not outputs:
        return value.new_zeros((1, schedule.output.numel(), heads, d_v)).to(out_dtype)
    per_slot = torch.cat(outputs).transpose(1, 2).reshape(-1, heads, d_v)  # [chunks * C, H, d_v]
    return _with_zero_row(per_slot)[schedule.output][None].to(out_dtype)


#: Values of the ``[chunks, H, C, C, d_k]`` per-channel pair decays built at once (the rest in further slices of
#: chunks), so a long sequence's temporary stays bounded.
CHANNEL_PAIR_BUDGET = 2**25


def _channel_weighted_pairs(query, key, key_beta, decay, causal) -> tuple[torch.Tensor, torch.Tensor]:
    """``(beta k_i) . k_j`` and ``q_i . k_j``, each channel weighted by its decay from slot ``j`` to ``i`` (zero above
    the diagonal): ``[chunks, H, C, C]``, built a slice of chunks at a time."""
    chunks, heads, chunk, d_k = key.shape
    step = max(1, CHANNEL_PAIR_BUDGET // (heads * chunk * chunk * d_k))
    systems, withins = [], []
    for first in range(0, chunks, step):
        part = slice(first, first + step)
        pair = (decay[part, :, :, None, :] - decay[part, :, None, :, :]).masked_fill(~causal[..., None], float("-inf"))
        weighted = key[part, :, None, :, :] * pair.exp()  # [c, H, C, C, d_k]: k_j decayed to slot i
        systems.append((key_beta[part, :, :, None, :] * weighted).sum(dim=-1))
        withins.append((query[part, :, :, None, :] * weighted).sum(dim=-1))
    if not systems:  # no segment at all
        return key.new_zeros((0, heads, chunk, chunk)), key.new_zeros((0, heads, chunk, chunk))
    return torch.cat(systems), torch.cat(withins)


def ragged_mamba2_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_limit: tuple[float, float],
    schedule: ChunkSchedule,
) -> torch.Tensor:
    """Mamba2's selective scan ``[1, N, H, P]`` for inputs ``hidden_states [1, N, H, P]``, time steps ``dt [1, N, H]``
    (before ``dt_bias`` and softplus, clamped to ``dt_limit`` after), ``A [H]`` (negative decay rates), ``B, C [1, N,
    G, S]`` (G groups of heads) and the skip ``D [H]``; every segment of ``schedule`` from its own initial state. The
    time-step arithmetic runs in ``dt``'s dtype, the scan in float32, and the skip term promotes as transformers' torch
    path does; tokens in no segment get the skip term only."""
    heads, groups = hidden_states.size(2), B.size(2)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    dt = torch.clamp(F.softplus(dt), min=dt_limit[0], max=dt_limit[1])
    x = hidden_states[0].to(COMPUTE_DTYPE)
    step = dt[0].to(COMPUTE_DTYPE)  # [N, H]
    B, C = (t[0].to(COMPUTE_DTYPE).repeat_interleave(heads // groups, dim=1) for t in (B, C))  # [N, H, S]
    inputs = _chunked(x * step[..., None], schedule)  # [chunks, H, L, P]
    B, C = _chunked(B, schedule), _chunked(C, schedule)  # [chunks, H, L, S]
    log_decay = _chunked(A.to(COMPUTE_DTYPE) * step, schedule).cumsum(dim=-1)  # [chunks, H, L], 0 past a segment

    chunk = inputs.size(2)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    pair_decay = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    within = ((C @ B.transpose(-1, -2)) * pair_decay) @ inputs  # [chunks, H, L, P]
    to_end = (log_decay[..., -1:] - log_decay).exp()
    written = (B * to_end[..., None]).transpose(-1, -2) @ inputs  # [chunks, H, S, P]: the chunk's own state
    chunk_decay = log_decay[..., -1].exp()[..., None, None]
    reads = C * log_decay.exp()[..., None]  # the chunk's start state, decayed to each slot

    state_shape = (heads, B.size(-1), inputs.size(-1))
    outputs = []
    final_states = None
    for level, steps in enumerate(schedule.steps):  # tree depths: roots from zero, then each from its parents
        if schedule.level_sizes[level] == 0:
            continue
        if level == 0:
            state = x.new_zeros((schedule.level_sizes[0], *state_shape))
        else:
            state = final_states[schedule.parent_rank[level]]
        for first, active in steps:
            rows = slice(first, first + active)
            current = state[:active]
            outputs.append(within[rows] + reads[rows] @ current)
            advanced = current * chunk_decay[rows] + written[rows]
            state = advanced if active == state.size(0) else torch.cat([advanced, state[active:]])
        final_states = state
    if outputs:
        per_slot = torch.cat(outputs).transpose(1, 2).reshape(-1, heads, inputs.size(-1))  # [chunks * L, H, P]
        scanned = _with_zero_row(per_slot)[schedule.output]
    else:
        scanned = x.new_zeros(x.shape)
    if D is not None:
        scanned = scanned + D[:, None] * x
    return scanned[None]
