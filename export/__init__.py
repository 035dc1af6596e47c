"""Export: checkpoints to ONNX, FP16 ONNX and TensorRT engines, and their verification (extra ``export``).

Importing this package does not import torch; its modules do.
"""
