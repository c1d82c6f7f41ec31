"""pGESAM-RT realtime engine: runs an exported ONNX bundle with onnxruntime and numpy only (never torch)."""
__version__ = "0.1.0"
