"""RNN / GRU / LSTM converters (compiler/frontend/convert_rnn.py) against ONNX Runtime.

The ONNX node cases cover the defaults, a bias, batch-first layout, reverse and bidirectional
directions; these add what they do not: ``sequence_lens``, ``clip``, non-default activations with
alpha/beta, ``linear_before_reset``, peepholes with initial states, and layout 1 with all outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper

from tests.test_frontend import check, make_model, randn

SEQ, BATCH, INPUT, HIDDEN = 5, 3, 4, 6
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def _case(op: str, directions: int, layout: int = 0, **attrs):
    """A model running ``op`` with every optional input, and feeds for it."""
    g = GATES[op]
    names = ["X", "W", "R", "B", "lens", "h0"] + (["c0", "P"] if op == "LSTM" else [])
    x_shape = [SEQ, BATCH, INPUT] if layout == 0 else [BATCH, SEQ, INPUT]
    state = [directions, BATCH, HIDDEN] if layout == 0 else [BATCH, directions, HIDDEN]
    shapes = {
        "X": x_shape,
        "W": [directions, g * HIDDEN, INPUT],
        "R": [directions, g * HIDDEN, HIDDEN],
        "B": [directions, 2 * g * HIDDEN],
        "h0": state,
        "c0": state,
        "P": [directions, 3 * HIDDEN],
    }
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, names, outs, hidden_size=HIDDEN, layout=layout, **attrs)
    y_shape = [SEQ, directions, BATCH, HIDDEN] if layout == 0 else [BATCH, SEQ, directions, HIDDEN]
    inputs = [(n, TP.INT32 if n == "lens" else TP.FLOAT, shapes.get(n, [BATCH])) for n in names]
    outputs = [("Y", TP.FLOAT, y_shape)] + [(o, TP.FLOAT, state) for o in outs[1:]]
    model = make_model([node], inputs, outputs, opset=14)
    feeds = {n: randn(*shapes[n]) * 0.5 for n in names if n != "lens"}
    feeds["lens"] = np.array([SEQ, 2, 4], np.int32)  # shorter sequences keep their last state
    return model, feeds


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_rnn_with_sequence_lens_and_activation_parameters(direction, tmp_path):
    two = direction == "bidirectional"
    acts = ["LeakyRelu", "ScaledTanh"] if two else ["HardSigmoid"]
    model, feeds = _case(
        "RNN",
        2 if two else 1,
        direction=direction,
        activations=acts,
        activation_alpha=[0.1, 0.7] if two else [0.3],
        activation_beta=[1.3] if two else [0.4],
        clip=1.5,
    )
    check(model, [feeds], tmp_path, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_gru_bidirectional_with_sequence_lens_and_clip(linear_before_reset, tmp_path):
    model, feeds = _case(
        "GRU",
        2,
        direction="bidirectional",
        linear_before_reset=linear_before_reset,
        clip=0.8,
    )
    check(model, [feeds], tmp_path, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
def test_lstm_peepholes_initial_states_and_sequence_lens(direction, tmp_path):
    directions = 2 if direction == "bidirectional" else 1
    acts = ["Sigmoid", "Softsign", "Tanh"] * directions
    model, feeds = _case("LSTM", directions, direction=direction, activations=acts)
    check(model, [feeds], tmp_path, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_batch_first_layout_all_outputs(op, tmp_path):
    model, feeds = _case(op, 2, layout=1, direction="bidirectional")
    # ORT implements layout 1 for none of the three; onnx's NumPy reference does, but ignores
    # sequence_lens, so every sequence is full length here.
    feeds["lens"] = np.full(BATCH, SEQ, np.int32)
    check(model, [feeds], tmp_path, rtol=1e-4, atol=1e-5, reference="onnx")


def test_lstm_input_forget(tmp_path):
    model, feeds = _case("LSTM", 1, input_forget=1)
    check(model, [feeds], tmp_path, rtol=1e-4, atol=1e-5)
