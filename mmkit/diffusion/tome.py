"""Token Merging for Stable Diffusion (ToMeSD, Bolya & Hoffman 2023) as an attention-processor patch.

Inside each selected self-attention (``attn1``) processor: the layer's input tokens (the block's
``norm1`` output, (B, N, C)) are merged by bipartite soft matching on their (h, w) grid
(:func:`mmkit.ops.tome.bipartite_soft_matching_2d`), attention runs on the N - r merged tokens, and
the output is unmerged back to N tokens. Merging is only around attn1, as in tomesd's defaults.

Faithful to tomesd: ``r = int(N * ratio)``; one destination per ``sy x sx`` cell, at a random
position when ``use_rand`` (forced off for odd batches, where prompted and unprompted samples do not
share a batch) and top-left otherwise; merge by mean; only blocks whose downsample factor is at most
``max_downsample``. One difference: tomesd matches on the block input *before* ``norm1``; a processor
sees the normed tokens, so the cosine similarity is taken on those (the tokens that are merged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import StrictConfig
from .context import DenoiseContext
from .patch import Patch, PatchTarget, downsample_factors
from .processors import MmkitAttnProcessor


@dataclass
class ToMeConfig(StrictConfig):
    """Plain ToMe, tomesd's published defaults.

    ratio: fraction of tokens merged away, r = int(N * ratio), clamped to the N (1 - 1/(sx*sy)) sources.
    max_downsample: patch blocks whose latent downsample factor is at most this (1 = highest resolution).
    sx, sy: destination cell size (one destination token per sy x sx cell).
    use_rand: random destination inside each cell (off automatically for odd batch sizes).
    seed: seed of the patch's own generator; None copies torch's global RNG state when the patch is
        applied (the global RNG itself is never advanced).
    backend: mmkit attention backend for the merged attention (None = automatic).
    """

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    seed: int | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        check_merge_numbers(type(self).__name__, self.ratio, self.sx, self.sy)
        check_max_downsample(type(self).__name__, self.max_downsample)


def check_merge_numbers(who: str, ratio: float, sx: int, sy: int) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{who}: ratio must be in [0, 1), got {ratio}")
    if int(sx) != sx or int(sy) != sy or sx < 1 or sy < 1:
        raise ValueError(f"{who}: sx and sy must be positive integers, got sx={sx}, sy={sy}")


def check_max_downsample(who: str, max_downsample: int) -> None:
    if int(max_downsample) != max_downsample or max_downsample < 1:
        raise ValueError(f"{who}: max_downsample must be a positive integer (1, 2, 4, 8), got {max_downsample}")


# ---------------------------------------------------------------------- shared runtime
@dataclass
class MergeRecord:
    """What one merging processor did on its most recent call (for inspection and tests).

    tokens: N in; merged_tokens: N - r attended; agents: agent tokens (0 = plain attention);
    grid: (h, w); step: the context's step; entry: index of the schedule entry used (AgentSD).
    """

    step: int | None
    grid: tuple[int, int]
    tokens: int
    merged_tokens: int
    agents: int = 0
    entry: int | None = None


POOL_SIZE = 65536  # uniform draws per layer and step for compiled graphs (>= the cells of a 2048 px SD latent)


@dataclass(eq=False)
class MergeRuntime:
    """State shared by the processors of one application of a merging patch.

    context: the handle's :class:`DenoiseContext`; generator: the patch's RNG for destination choice;
    records: ``{processor path: MergeRecord}`` of each layer's latest call (eager calls only);
    entry: the schedule entry in force (AgentSD), kept up to date from the context's step outside any
    compiled graph; pool: (layers, POOL_SIZE) uniform draws refreshed at every step, from which a compiled
    graph takes its destination choices (a graph cannot call a torch.Generator), from ``pool_generator``.
    """

    context: DenoiseContext
    generator: torch.Generator
    records: dict[str, MergeRecord] = field(default_factory=dict)
    entry_at: Any = None
    entry: int | None = 0
    layers: int = 0
    pool: Tensor | None = None
    pool_generator: torch.Generator | None = None

    @classmethod
    def create(cls, context: DenoiseContext, seed: int | None, *, entry_at: Any = None, layers: int = 0) -> MergeRuntime:
        """``entry_at(step) -> entry index`` for scheduled patches; ``layers``: rows of the compiled-graph pool."""
        g = torch.Generator()
        if seed is None:
            g.set_state(torch.get_rng_state())  # a copy: the global RNG is not advanced
        else:
            g.manual_seed(seed)
        copy = torch.Generator()
        copy.set_state(g.get_state())
        pool_g = torch.Generator()  # its own stream: compiled draws leave the eager choices as they were
        pool_g.manual_seed(int(torch.randint(2**62, (), generator=copy)) + 1)
        runtime = cls(context=context, generator=g, entry_at=entry_at, layers=layers, pool_generator=pool_g)
        runtime.on_step(context.step)
        context.subscribe(runtime.on_step)
        return runtime

    def on_step(self, step: int | None) -> None:
        """The context moved to ``step`` (called outside any graph): the schedule entry and fresh draws."""
        if self.entry_at is not None:
            self.entry = self.entry_at(step)
        if self.layers:
            self.pool = torch.rand(self.layers, POOL_SIZE, generator=self.pool_generator)

    def compiled_choice(self, layer: int, cells: int, places: int, device: torch.device) -> Tensor:
        """(cells,) destination places for layer ``layer`` inside a compiled graph, from this step's draws."""
        if self.pool is None or layer >= self.pool.shape[0] or cells > POOL_SIZE:
            raise RuntimeError(f"no destination draws for layer {layer} with {cells} cells: apply the patch with "
                               f"patch(...) before compiling (at most {POOL_SIZE} cells per layer)")
        return (self.pool[layer, :cells] * places).long().to(device)

    def grid(self, who: str, tokens: int, downsample: int) -> tuple[int, int]:
        """(h, w) of a layer with ``tokens`` tokens in a block downsampled ``downsample`` times."""
        H, W = self.context.require_latent_size(who)
        h, w = math.ceil(H / downsample), math.ceil(W / downsample)
        if h * w != tokens:
            raise ValueError(
                f"{who}: a block with downsample factor {downsample} of a {H}x{W} latent should see {h}x{w} = "
                f"{h * w} tokens, but got {tokens}. Is the context's latent size stale (a block called directly "
                "after a UNet run at another size)? Call context.observe(timestep, (H, W)) first."
            )
        return h, w


@dataclass(eq=False)
class SlotMerge:
    """A token merge as the merged-sequence slot of every token: one ``scatter_reduce`` (mean) merges,
    one ``gather`` unmerges.

    slots: (B, N) int64, the slot of token i of sample b (one slot per destination, then the kept
    sources); num_out: M, the number of slots.
    """

    slots: Tensor
    num_out: int
    _index: Tensor | None = None  # (B, N, C) expanded slots, made by the first merge, reused by unmerge

    @property
    def num_tokens(self) -> int:
        return self.slots.shape[1]

    def _expanded(self, C: int) -> Tensor:
        if self._index is None or self._index.shape[-1] != C:
            self._index = self.slots.unsqueeze(-1).expand(-1, -1, C)  # (B, N, C)
        return self._index

    def merge(self, x: Tensor) -> Tensor:
        """x: (B, N, C) -> (B, M, C), the mean of the tokens in each slot."""
        B, N, C = x.shape
        if (B, N) != tuple(self.slots.shape):
            raise ValueError(f"this merge was built for (B, N) = {tuple(self.slots.shape)}, got x {tuple(x.shape)}")
        return x.new_zeros(B, self.num_out, C).scatter_reduce_(1, self._expanded(C), x, "mean", include_self=False)

    def unmerge(self, y: Tensor) -> Tensor:
        """y: (B, M, C) -> (B, N, C); every token takes its slot's value."""
        B, M, C = y.shape
        if M != self.num_out or B != self.slots.shape[0]:
            raise ValueError(f"unmerge expects (B, M) = ({self.slots.shape[0]}, {self.num_out}), got y {tuple(y.shape)}")
        return y.gather(1, self._expanded(C))


@dataclass(frozen=True, eq=False)
class GridTables:
    """Index tables of an (h, w) grid cut into sy x sx cells; they depend only on the shapes, so they are
    built once per (h, w, sx, sy, device) and reused by every call (:func:`grid_tables`).

    cell_base: (cells,) position of each full cell's top-left token, cells in row-major order;
    offset_pos: (sx * sy,) position offset of each place inside a cell; cell_of: (N,) the cell of each token
    (0 outside full cells: only read for destinations); zeros: (cells,) the choice without randomness.
    """

    cells: int
    cell_base: Tensor
    offset_pos: Tensor
    cell_of: Tensor
    zeros: Tensor


_GRID_TABLES: dict[tuple, GridTables] = {}


def grid_tables(h: int, w: int, sx: int, sy: int, device: torch.device) -> GridTables:
    key = (h, w, sx, sy, device)
    found = _GRID_TABLES.get(key)
    if found is None:
        ch, cw = h // sy, w // sx
        rows = torch.arange(ch, device=device)[:, None] * sy * w  # (ch, 1)
        cols = torch.arange(cw, device=device)[None, :] * sx  # (1, cw)
        cell_base = (rows + cols).flatten()  # (cells,)
        offset_pos = (torch.arange(sy, device=device)[:, None] * w + torch.arange(sx, device=device)[None, :]).flatten()
        r, c = torch.arange(h, device=device)[:, None], torch.arange(w, device=device)[None, :]
        cell_of = ((r // sy).clamp(max=max(ch - 1, 0)) * cw + (c // sx).clamp(max=max(cw - 1, 0))).flatten()
        found = GridTables(cells=ch * cw, cell_base=cell_base, offset_pos=offset_pos, cell_of=cell_of,
                           zeros=torch.zeros(ch * cw, dtype=torch.long, device=device))
        if len(_GRID_TABLES) > 64:
            _GRID_TABLES.pop(next(iter(_GRID_TABLES)))
        _GRID_TABLES[key] = found
    return found


def plan_merges(
    x: Tensor,
    grid: tuple[int, int],
    *,
    ratio: float,
    sx: int,
    sy: int,
    randomize: bool,
    generator: torch.Generator,
    agent_ratio: float = 0.0,
    choice: Tensor | None = None,
) -> tuple[SlotMerge | None, SlotMerge | None]:
    """One bipartite soft matching of x (B, N, C) (as :func:`mmkit.ops.tome.bipartite_soft_matching_2d`),
    read at two strengths.

    Returns ``(merge, agent_merge)``: ``merge`` removes ``r = int(N * ratio)`` tokens (None when r = 0);
    ``agent_merge`` removes ``int(N * agent_ratio)`` (clamped to the number of sources) and gives the
    agent tokens, or None unless the agents are fewer than half the merged tokens (AgentSD's rule
    ``agents * 2 < N - r``). Both come from the same destinations and similarity order, as in AgentSD.
    Slots: the destinations in cell order, then the kept sources in descending similarity (ties by token
    position). Index tables depend only on the shapes and are cached; per call it runs ~20 ops.
    """
    h, w = grid
    B, N, _ = x.shape
    t = grid_tables(h, w, sx, sy, x.device)
    num_src = N - t.cells
    r = min(int(N * ratio), num_src) if t.cells else 0
    agent_r = min(int(N * agent_ratio), num_src) if t.cells else 0
    use_agents = agent_r > r and (N - agent_r) * 2 < N - r
    if r <= 0 and not use_agents:
        return None, None
    if not randomize:
        choice = t.zeros
    elif choice is None:  # (given: the place of each cell's destination, drawn elsewhere)
        choice = torch.randint(sx * sy, (t.cells,), generator=generator, device=generator.device)
        if choice.device != x.device:
            choice = choice.to(x.device)
    dst_idx = t.cell_base + t.offset_pos[choice]  # (cells,) one destination per cell
    is_dst = torch.zeros(N, dtype=torch.bool, device=x.device).index_fill_(0, dst_idx, True)  # (N,)
    with torch.no_grad():
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, N, C)
        sim = torch.bmm(unit, unit[:, dst_idx].transpose(1, 2))  # (B, N, cells) cosine to every destination
        best, best_dst = sim.max(dim=-1)  # (B, N)
        order = best.masked_fill(is_dst, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        rank = order.argsort(dim=-1)  # (B, N) inverse permutation: sources by similarity, destinations last
    merge = _slot_merge(rank, best_dst, is_dst, t, r, num_src) if r > 0 else None
    agents = _slot_merge(rank, best_dst, is_dst, t, agent_r, num_src) if use_agents else None
    return merge, agents


def _slot_merge(rank: Tensor, best_dst: Tensor, is_dst: Tensor, t: GridTables, r: int, num_src: int) -> SlotMerge:
    """Slots when the r most similar sources merge: one per destination (cell order), then the kept sources."""
    n_kept = num_src - r
    if n_kept == 0:  # every source merges (AgentSD's agents): a token's slot is its destination's cell
        slots = torch.where(is_dst, t.cell_of, best_dst)
    else:  # kept sources after the destinations; rank - r counts them in descending similarity
        slots = torch.where(is_dst, t.cell_of, torch.where(rank < r, best_dst, rank + (t.cells - r)))
    return SlotMerge(slots=slots, num_out=n_kept + t.cells)


# ---------------------------------------------------------------------- processor and patch
class MergingAttnProcessor(MmkitAttnProcessor):
    """Base of the processors that merge a layer's tokens (ToMe, AgentSD).

    config: the patch's config (its ``backend`` field picks the attention backend); runtime: the
    :class:`MergeRuntime` shared with the patch's other layers; downsample: this layer's block
    downsample factor; path: its processor path (for records and error messages).
    """

    def __init__(self, config: Any, *, runtime: MergeRuntime, downsample: int, path: str = "", layer: int = 0) -> None:
        super().__init__(backend=config.backend)
        self.config = config
        self.runtime = runtime
        self.downsample = downsample
        self.path = path
        self.layer = layer  # this processor's row of the runtime's draws

    def plan(self, x: Tensor, grid: tuple[int, int], *, ratio: float, sx: int, sy: int,
             agent_ratio: float = 0.0) -> tuple[SlotMerge | None, SlotMerge | None]:
        """:func:`plan_merges` with this patch's randomness (the generator, or in a compiled graph the draws)."""
        randomize = self.config.use_rand and x.shape[0] % 2 == 0
        choice = None
        if randomize and torch.compiler.is_compiling():
            cells = (grid[0] // sy) * (grid[1] // sx)
            choice = self.runtime.compiled_choice(self.layer, cells, sx * sy, x.device)
        return plan_merges(x, grid, ratio=ratio, sx=sx, sy=sy, randomize=randomize, generator=self.runtime.generator,
                           agent_ratio=agent_ratio, choice=choice)

    def record(self, **fields: Any) -> None:
        """Keep what this call did in ``runtime.records`` (eager calls; a compiled graph keeps no records)."""
        if not torch.compiler.is_compiling():
            self.runtime.records[self.path] = MergeRecord(step=self.runtime.context.step, **fields)


class ToMeAttnProcessor(MergingAttnProcessor):
    """Self-attention processor that merges its tokens, attends on the merged set and unmerges.

    Constructed as :class:`MergingAttnProcessor` with a :class:`ToMeConfig`.
    """

    def attend(
        self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None, attention_mask: Tensor | None
    ) -> Tensor:
        cfg = self.config
        check_mergeable(type(self).__name__, hidden_states, encoder_hidden_states, attention_mask)
        B, N, _ = hidden_states.shape
        grid = self.runtime.grid(f"{type(self).__name__} at {self.path or 'this layer'}", N, self.downsample)
        merge, _ = self.plan(hidden_states, grid, ratio=cfg.ratio, sx=cfg.sx, sy=cfg.sy)
        self.record(grid=grid, tokens=N, merged_tokens=merge.num_out if merge else N)
        if merge is None:
            return super().attend(attn, hidden_states, None, None)
        merged = merge.merge(hidden_states)  # (B, N - r, C)
        out = super().attend(attn, merged, None, None)  # (B, N - r, C_out)
        return merge.unmerge(out)  # (B, N, C_out)

    def __repr__(self) -> str:
        return f"ToMeAttnProcessor(ratio={self.config.ratio}, sx={self.config.sx}, sy={self.config.sy}, x{self.downsample})"


def check_mergeable(who: str, x: Tensor, encoder_hidden_states: Tensor | None, attention_mask: Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"{who} merges (B, N, C) tokens; got hidden states {tuple(x.shape)}")
    if encoder_hidden_states is not None:
        raise ValueError(
            f"{who} merges self-attention tokens, but this layer got encoder_hidden_states "
            f"{tuple(encoder_hidden_states.shape)}; select self-attention layers only (kind='self')"
        )
    if attention_mask is not None:
        raise ValueError(
            f"{who} cannot merge tokens under an attention mask {tuple(attention_mask.shape)} (it indexes the "
            "unmerged tokens); leave this layer unpatched"
        )


class MergingPatch(Patch):
    """Base of the token-merging patches: one ``processor_class`` instance per selected self-attention
    layer up to ``config.max_downsample``, all sharing a fresh :class:`MergeRuntime` per application."""

    processor_class: type[MergingAttnProcessor]
    config: Any
    runtime: MergeRuntime | None

    def processors(self, target: PatchTarget) -> dict[str, Any]:
        paths = merging_paths(self, target, self.config.max_downsample)
        self.runtime = MergeRuntime.create(target.context, self.config.seed, entry_at=self.entry_at, layers=len(paths))
        return {path: self.processor_class(self.config, runtime=self.runtime, downsample=target.downsample(path),
                                           path=path, layer=i) for i, path in enumerate(paths)}

    entry_at: Any = None  # scheduled patches: step -> schedule entry


class ToMe(MergingPatch):
    """Plain ToMe on the self-attention of the highest-resolution blocks: ``patch(pipe, ToMe())``.

    ``ToMe(ToMeConfig(ratio=0.3))`` or ``ToMe(ratio=0.3)``. After each application ``self.runtime``
    holds the shared state, ``self.runtime.records`` what every layer did on its latest call.
    """

    processor_class = ToMeAttnProcessor

    def __init__(self, config: ToMeConfig | None = None, *, ratio: float | None = None) -> None:
        config = config if config is not None else ToMeConfig()
        if not isinstance(config, ToMeConfig):
            raise TypeError(f"ToMe takes a ToMeConfig, got {type(config).__name__}")
        self.config = config if ratio is None else config.replace(ratio=ratio)
        self.runtime: MergeRuntime | None = None


    def describe(self) -> str:
        c = self.config
        return f"ToMe(ratio={c.ratio}, sx={c.sx}, sy={c.sy}, max_downsample={c.max_downsample})"


def merging_paths(patch: Patch, target: PatchTarget, max_downsample: int) -> list[str]:
    """The self-attention layers at downsample <= max_downsample (an error names the blocks when there are none)."""
    paths = target.select(kind="self", max_downsample=max_downsample)
    if not paths:
        raise ValueError(
            f"{patch.describe()} found no self-attention layer with downsample factor <= {max_downsample} in "
            f"{type(target.model).__name__} (block factors: {_factors(target)})"
        )
    return list(paths)


def _factors(target: PatchTarget) -> str:
    return ", ".join(f"{k}: {v}" for k, v in downsample_factors(target.model).items()) or "none"


__all__ = [
    "MergeRecord",
    "MergeRuntime",
    "ToMe",
    "ToMeAttnProcessor",
    "ToMeConfig",
    "GridTables",
    "SlotMerge",
    "grid_tables",
    "plan_merges",
]
