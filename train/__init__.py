"""Training: data synthesis, models, losses, trainers and checkpoints (extra ``train``).

Importing this package does not import torch; its modules do.
"""
