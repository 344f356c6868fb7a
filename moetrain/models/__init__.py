"""Single-device model code: the decoder LM and its MoE layers. No meshes or ranks here."""

from moetrain.models.attention import Attention
from moetrain.models.moe import MoELayer, MoEStats
from moetrain.models.transformer import (
    ParamCount,
    Transformer,
    TransformerBlock,
    count_params,
)

__all__ = [
    "Attention",
    "MoELayer",
    "MoEStats",
    "ParamCount",
    "Transformer",
    "TransformerBlock",
    "count_params",
]
