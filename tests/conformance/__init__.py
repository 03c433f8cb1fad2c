"""The ONNX backend node conformance suite through qiao's CPU path (see test_onnx_node_suite)."""
