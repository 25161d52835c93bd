"""Graph-rewrite passes: each is configured at construction and called on a model -> (model, PassReport)."""

from onnxshrink.passes.cluster import Cluster, ClusterConfig
from onnxshrink.passes.prune import Prune, PruneConfig
from onnxshrink.passes.prune_channels import PruneChannels
from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig, QuantizeBlockwise
from onnxshrink.passes.quantize_static import QuantizeStatic, StaticQuantizeConfig
from onnxshrink.passes.quantize_weights import QuantizeWeightsOnly, WeightsOnlyConfig

__all__ = ["BlockwiseConfig", "Cluster", "ClusterConfig", "Prune", "PruneChannels", "PruneConfig", "QuantizeBlockwise", "QuantizeConfig", "QuantizeDynamic", "QuantizeStatic", "QuantizeWeightsOnly",
           "StaticQuantizeConfig", "WeightsOnlyConfig"]
