"""The middle step of RM2S: the confidence map, its 2-means threshold and the stage-2 input.

One definition, four implementations side by side: ``reference`` (NumPy, the definition every
other one is tested against), ``cpu`` (OpenCV + NumPy, the runtime's), ``torch_ops`` (torch, for
training and the PyTorch backend) and ``cuda`` (the fused kernel of ``confidence.cu``, through CuPy
or pycuda, with one launch plan).
"""
