"""Conditioning embeddings shared by every family: timestep + class label -> one vector per sample."""

import torch
from diffusers.models.embeddings import LabelEmbedding, TimestepEmbedding, Timesteps
from torch import nn


class TimestepClassEmbedding(nn.Module):
    """
    The DiT conditioning vector `c = TimestepEmbedder(t) + LabelEmbedder(y)`.

    The frequency embedding is the original DiT one (`cat[cos, sin]`, frequencies `exp(-ln(1e4) * i / 128)`), i.e.
    diffusers `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`. diffusers'
    `CombinedTimestepLabelEmbeddings` uses `downscale_freq_shift=1` and therefore does not match the original models.

    Args:
        num_classes (`int`): Number of real classes. The null (unconditional) class id is `num_classes`.
        embedding_dim (`int`): Width D of the conditioning vector.
        class_dropout_prob (`float`): Probability of replacing a label by the null class in training mode.
        add_null_class (`bool`, *optional*): Whether the label table has the extra null row. Defaults to
            `class_dropout_prob > 0`, as in DiT; JiT keeps the row with a dropout of 0 (it drops labels outside).
        frequency_embedding_size (`int`): Width of the sinusoidal timestep features.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        class_dropout_prob: float = 0.1,
        add_null_class: bool | None = None,
        frequency_embedding_size: int = 256,
    ):
        super().__init__()
        self.time_proj = Timesteps(frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(frequency_embedding_size, embedding_dim)
        self.class_embedder = LabelEmbedding(num_classes, embedding_dim, class_dropout_prob)
        if add_null_class and class_dropout_prob == 0:
            self.class_embedder.embedding_table = nn.Embedding(num_classes + 1, embedding_dim)

    def forward(self, timestep: torch.Tensor, class_labels: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            timestep: (B,) model time in the family's own units (flow time in [0, 1] or DDPM index 0..999).
            class_labels: (B,) int64 class ids; `num_classes` is the null class.

        Returns:
            `(conditioning, label_embedding)`, each (B, D): the conditioning vector c, and its class part (labels
            dropped in training mode), which JiT also feeds to its blocks as in-context class tokens.
        """
        time_features = self.time_proj(timestep).to(self.timestep_embedder.linear_1.weight.dtype)
        label_embedding = self.class_embedder(class_labels)
        return self.timestep_embedder(time_features) + label_embedding, label_embedding
