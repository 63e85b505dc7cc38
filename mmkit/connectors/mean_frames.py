"""The mean-pooled-frames baseline for clips: every token position averaged over the clip's frames, then one
linear map into the LLM. It sees what a clip contains but not in which order (the baseline FAVOR's causal
Q-Former is compared with)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .base import Connector, ConnectorConfig


@dataclass
class MeanFramesConfig(ConnectorConfig):
    tokens_per_frame: int = 9
    bias: bool = True

    def __post_init__(self) -> None:
        if self.tokens_per_frame < 1:
            raise ValueError(f"MeanFramesConfig.tokens_per_frame must be >= 1, got {self.tokens_per_frame}")


class MeanFramesConnector(Connector):
    """(B, T * tokens_per_frame, vision_dim) + mask -> (B, tokens_per_frame, llm_dim): the time-average of each
    token position over the clip's real frames, projected."""

    kind = "mean_frames"
    config_class = MeanFramesConfig

    def __init__(self, config: MeanFramesConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.vision_dim, config.llm_dim, bias=config.bias)

    @classmethod
    def example_config(cls, vision_dim: int, llm_dim: int) -> dict:
        return dict(vision_dim=vision_dim, llm_dim=llm_dim, tokens_per_frame=3)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.config.tokens_per_frame

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, None]:
        tpf = self.config.tokens_per_frame
        B, N, D = features.shape
        if N % tpf:
            raise ValueError(f"a clip must hold whole frames of tokens_per_frame={tpf} tokens; got {N} tokens")
        frames = features.reshape(B, N // tpf, tpf, D)  # (B, T, tpf, D)
        if mask is None:
            pooled = frames.mean(dim=1)
        else:
            real = mask.reshape(B, N // tpf, tpf)[..., :1].to(features.dtype)  # (B, T, 1) frames that exist
            pooled = (frames * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp_min(1.0)
        return self.proj(pooled), None


__all__ = ["MeanFramesConfig", "MeanFramesConnector"]
