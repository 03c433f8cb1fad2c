"""ONNX schemas for the ONNX Runtime contrib operators that live in the *default* domain.

ONNX Runtime registers a few of its own operators in the ``ai.onnx`` domain, and its model
builders use them (ONNX Runtime GenAI's decoders call ``SimplifiedLayerNormalization`` there).
onnx's checker knows no such op and rejects the whole file ("No Op registered for
SimplifiedLayerNormalization with domain_version of 22"), so ``load_onnx`` registers these
schemas with onnx first. Only onnx is imported here: ``load_onnx`` runs without TVM.
"""

from __future__ import annotations

import functools

import onnx
from onnx.defs import OpSchema

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]


def _attribute(name: str, default) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), "")


@functools.cache
def register_ort_default_domain_schemas() -> None:
    """Tell onnx's checker about ONNX Runtime's default-domain contrib ops (idempotent)."""
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "SimplifiedLayerNormalization",
        "",
        1,
        doc="ONNX Runtime's RMS normalisation: x / sqrt(mean(x^2) + epsilon) * scale.",
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("scale", "V")],
        outputs=[
            OpSchema.FormalParameter("Y", "V"),
            OpSchema.FormalParameter("inv_std_var", "U", param_option=optional),
        ],
        type_constraints=[
            ("T", _FLOATS, ""),
            ("U", ["tensor(float)", "tensor(double)"], ""),
            ("V", _FLOATS, ""),
        ],
        attributes=[
            _attribute("axis", -1),
            _attribute("epsilon", 1e-5),
            _attribute("stash_type", 1),
        ],
    )
    try:
        onnx.defs.get_schema(schema.name, 1, schema.domain)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(schema)
