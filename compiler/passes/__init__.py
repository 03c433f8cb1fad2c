"""qiao.compiler.passes — qiao's Relax/TIR passes, one per module, named after the class."""

from qiao.compiler.passes.lower_attention import LowerAttention
from qiao.compiler.passes.lower_moe import LowerMoE
from qiao.compiler.passes.lower_quant import LowerQuant

__all__ = ["LowerAttention", "LowerMoE", "LowerQuant"]
