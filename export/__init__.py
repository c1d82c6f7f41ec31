"""torch -> ONNX export of pGESAM models into a self-describing bundle (one wrapper module per graph)."""
