"""AgentSD (Han et al., ECCV 2024): agent attention on ToMe-merged tokens in Stable Diffusion, training-free.

Inside each selected self-attention (``attn1``) processor, for the schedule entry of the current step:

1. one bipartite matching of the layer's tokens x (B, N, C) on their (h, w) grid, read twice: the
   ToMe merge (``r = int(N * ratio)``) gives the N' = N - r tokens attended, the aggressive merge
   (``int(N * agent_ratio)``, clamped to all sources: ~N / (sx * sy) tokens survive) gives the agents;
2. ``Q, K, V`` = projections of the merged tokens, ``A = to_q(agent tokens)``;
3. ``O = softmax(Q A^T s**0.3) softmax(A K^T s) V + 0.075 V`` (s = attn.scale), no agent bias, no DWC;
4. ``to_out``, then unmerge back to N tokens.

Agents are used only while they are fewer than half the merged tokens (``n * 2 < N'``, the official
rule); otherwise the layer runs plain ToMe attention on the N' tokens. The published schedule (50
steps): steps 0-19 ``sx = sy = 4, ratio 0.4, agent_ratio 0.95``; from step 20 ``sx = sy = 2, ratio 0.4,
agent_ratio 0.5``, where the rule switches agents off, i.e. plain ToMe. Steps come from the
:class:`~mmkit.diffusion.context.DenoiseContext`.

Differences from the official code (LDM only; its diffusers path is unfinished): matching uses the
normed tokens the processor sees (the official code matches on the block input before ``norm1``);
``ratio = 0`` keeps every token but still uses agents (the official code then skips agents too; set
``agent_ratio = 0`` for plain attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..config import StrictConfig
from ..ops.agent import agent_attention
from .processors import project_out, project_qkv
from .tome import (
    MergeRuntime,
    MergingAttnProcessor,
    MergingPatch,
    check_max_downsample,
    check_merge_numbers,
    check_mergeable,
)


@dataclass
class AgentSDStep(StrictConfig):
    """One schedule entry, in force from ``start_step`` until the next entry's start.

    ratio: ToMe merge ratio; agent_ratio: the aggressive merge that makes the agents (0 = no agents);
    sx, sy: destination cell size, shared by both merges.
    """

    start_step: int = 0
    ratio: float = 0.4
    agent_ratio: float = 0.95
    sx: int = 4
    sy: int = 4

    def __post_init__(self) -> None:
        check_merge_numbers(type(self).__name__, self.ratio, self.sx, self.sy)
        if not 0.0 <= self.agent_ratio <= 1.0:
            raise ValueError(f"AgentSDStep: agent_ratio must be in [0, 1], got {self.agent_ratio}")
        if int(self.start_step) != self.start_step or self.start_step < 0:
            raise ValueError(f"AgentSDStep: start_step must be a non-negative integer, got {self.start_step}")


def published_schedule() -> tuple[AgentSDStep, ...]:
    """AgentSD's schedule for 50-step sampling: agents + ToMe for steps 0-19, plain ToMe after."""
    return (
        AgentSDStep(start_step=0, ratio=0.4, agent_ratio=0.95, sx=4, sy=4),
        AgentSDStep(start_step=20, ratio=0.4, agent_ratio=0.5, sx=2, sy=2),
    )


@dataclass
class AgentSDConfig(StrictConfig):
    """AgentSD with the official defaults.

    schedule: entries sorted by ``start_step`` (a list of dicts is accepted by ``from_dict``); steps
        before the first entry run unpatched attention.
    max_downsample: patch blocks whose latent downsample factor is at most this (1 = highest resolution).
    agent_scale_exponent: k_scale2, the second softmax uses ``scale ** 0.3``.
    shortcut: k_shortcut, adds ``0.075 * V``.
    use_rand: random destination inside each cell (off automatically for odd batch sizes).
    seed: the patch's own generator seed; None copies torch's global RNG state at apply time.
    backend: mmkit attention backend for all attention calls (None = automatic).
    """

    schedule: tuple[AgentSDStep, ...] = field(default_factory=published_schedule)
    max_downsample: int = 1
    agent_scale_exponent: float = 0.3
    shortcut: float = 0.075
    use_rand: bool = True
    seed: int | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        entries = []
        for i, e in enumerate(self.schedule):
            if isinstance(e, dict):
                e = AgentSDStep.from_dict(e)
            if not isinstance(e, AgentSDStep):
                raise TypeError(f"AgentSDConfig.schedule[{i}] must be an AgentSDStep or a dict, got {type(e).__name__}")
            entries.append(e)
        if not entries:
            raise ValueError("AgentSDConfig.schedule needs at least one entry, e.g. AgentSDStep(start_step=0)")
        starts = [e.start_step for e in entries]
        if starts != sorted(set(starts)):
            raise ValueError(f"AgentSDConfig.schedule start_step values must strictly increase, got {starts}")
        self.schedule = tuple(entries)
        check_max_downsample(type(self).__name__, self.max_downsample)

    def entry_at(self, step: int | None) -> int | None:
        """Index of the schedule entry in force at ``step`` (None before the first entry).

        An unknown step (None: no timestep seen) counts as step 0.
        """
        step = 0 if step is None else step
        found = None
        for i, e in enumerate(self.schedule):
            if e.start_step <= step:
                found = i
        return found


class AgentSDAttnProcessor(MergingAttnProcessor):
    """Self-attention processor: ToMe merge, agent attention (or plain attention), unmerge.

    config: :class:`AgentSDConfig`; runtime: the :class:`~mmkit.diffusion.tome.MergeRuntime` shared by
    the patch's layers (context, generator, records); downsample: this layer's block downsample factor.
    Usable on its own: ``AgentSDAttnProcessor(cfg, runtime=MergeRuntime.create(ctx, seed=0), downsample=1)``
    after ``ctx.observe(timestep, (H, W))``.
    """

    def attend(
        self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None, attention_mask: Tensor | None
    ) -> Tensor:
        cfg = self.config
        index = self.runtime.entry  # kept up to date from the step outside any compiled graph
        if index is None:
            return super().attend(attn, hidden_states, encoder_hidden_states, attention_mask)
        entry = cfg.schedule[index]
        who = f"{type(self).__name__} at {self.path or 'this layer'}"
        check_mergeable(who, hidden_states, encoder_hidden_states, attention_mask)
        B, N, _ = hidden_states.shape
        grid = self.runtime.grid(who, N, self.downsample)
        merge, agent_merge = self.plan(hidden_states, grid, ratio=entry.ratio, sx=entry.sx, sy=entry.sy,
                                       agent_ratio=entry.agent_ratio)
        merged = merge.merge(hidden_states) if merge is not None else hidden_states  # (B, N', C)
        self.record(grid=grid, tokens=N, merged_tokens=merged.shape[1],
                    agents=agent_merge.num_out if agent_merge is not None else 0, entry=index)
        if agent_merge is None:
            out = super().attend(attn, merged, None, None)  # (B, N', C_out)
        else:
            agent_tokens = agent_merge.merge(hidden_states)  # (B, n, C)
            out = self.agent_attend(attn, merged, agent_tokens)  # (B, N', C_out)
        return merge.unmerge(out) if merge is not None else out

    def agent_attend(self, attn: nn.Module, x: Tensor, agent_tokens: Tensor) -> Tensor:
        """x: (B, N', C) merged tokens, agent_tokens: (B, n, C) -> (B, N', C_out)."""
        q, k, v = project_qkv(attn, x, x)  # (B, N', H, D) each
        agents = attn.to_q(agent_tokens).unflatten(-1, (attn.heads, -1))  # (B, n, H, D)
        if attn.norm_q is not None:
            agents = attn.norm_q(agents)
        out = agent_attention(
            q, k, v, agents=agents, scale=attn.scale,
            agent_scale_exponent=self.config.agent_scale_exponent, shortcut=self.config.shortcut,
            backend=self.backend,
        )  # (B, N', H, Dv)
        return project_out(attn, out.flatten(2).to(q.dtype))

    def __repr__(self) -> str:
        return f"AgentSDAttnProcessor({len(self.config.schedule)} schedule entries, x{self.downsample})"


class AgentSD(MergingPatch):
    """AgentSD on the self-attention of the highest-resolution blocks: ``patch(pipe, AgentSD())``.

    ``AgentSD(AgentSDConfig(max_downsample=2))``; ``AgentSD(ratio=0.5)`` sets the merge ratio of every
    schedule entry. After each application ``self.runtime.records`` holds what every layer did last.
    """

    processor_class = AgentSDAttnProcessor

    def __init__(self, config: AgentSDConfig | None = None, *, ratio: float | None = None) -> None:
        config = config if config is not None else AgentSDConfig()
        if not isinstance(config, AgentSDConfig):
            raise TypeError(f"AgentSD takes an AgentSDConfig, got {type(config).__name__}")
        if ratio is not None:
            config = config.replace(schedule=tuple(e.replace(ratio=ratio) for e in config.schedule))
        self.config = config
        self.runtime: MergeRuntime | None = None

    def entry_at(self, step: int | None) -> int | None:
        return self.config.entry_at(step)

    def describe(self) -> str:
        c = self.config
        steps = "; ".join(
            f"{e.start_step}+: r={e.ratio} agents={e.agent_ratio} s={e.sx}x{e.sy}" for e in c.schedule
        )
        return f"AgentSD(max_downsample={c.max_downsample}, schedule=[{steps}])"


__all__ = ["AgentSD", "AgentSDAttnProcessor", "AgentSDConfig", "AgentSDStep", "published_schedule"]
