"""ONNX export (`kpnet export`): graph-friendly decode ops (`decode`), the exported graph and its sidecar
(`graph`, needs the `export` extra) and the onnxruntime side of `eval --onnx` / `viz --onnx` (`runtime`)."""
