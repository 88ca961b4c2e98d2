"""Task heads shared by every encoder family: pooled features -> MLP -> outputs.

Shapes: ``feats_BD`` pooled encoder features, output ``[B, num_outputs]``.
"""
from __future__ import annotations

import torch
from torch import nn


class MLPHead(nn.Module):
    """Classification or regression head on pooled features.

    Parameters
    ----------
    in_dim : int
        Width of the pooled features.
    num_outputs : int
        1 for binary classification (logit) or scalar regression; ``k`` for k-way logits.
    hidden_dim : int or None
        Hidden width of the MLP; ``None`` gives a single linear layer (a linear probe).
    dropout : float
        Dropout before the last layer.
    readout : type
        Class of the final layer; pass ``mup.MuReadout`` under muP.
    """

    def __init__(self, in_dim: int, num_outputs: int = 1, *, hidden_dim: int | None = None,
                 dropout: float = 0.0, readout: type = nn.Linear) -> None:
        super().__init__()
        if in_dim <= 0 or num_outputs <= 0:
            raise ValueError(f"in_dim and num_outputs must be positive, got {in_dim}, {num_outputs}")
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)]
        last_in = in_dim
        if hidden_dim is not None:
            layers += [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            last_in = hidden_dim
        layers += [nn.Dropout(dropout), readout(last_in, num_outputs)]
        self.net = nn.Sequential(*layers)

    def forward(self, feats_BD: torch.Tensor) -> torch.Tensor:
        return self.net(feats_BD)
