"""CRRN: one network, GiN and IiN inside, giving the background, the reflection and B's gradient."""

from __future__ import annotations

from typing import Any

import numpy as np
from dereflect.methods.base import NULL_TIMER, Executor, Layers, Method, NetworkContract, TensorContract, Timer

CRRN_NETWORK = NetworkContract(
    "crrn", ("crrn",), TensorContract("image", 3),
    (TensorContract("background", 3), TensorContract("reflection", 3, (-1.0, 1.0)),
     TensorContract("gradient", 1, (0.0, 1.5))),
)


class CRRN(Method):
    name = "crrn"
    networks = (CRRN_NETWORK,)
    stages = ("upload", "crrn", "download")
    checkpoint_kinds = ("crrn",)

    def run(self, executor: Executor, image: np.ndarray, settings: Any = None, timer: Timer = NULL_TIMER,
            intermediates: bool = False) -> Layers:
        with timer.stage("upload"):
            x = executor.upload(image)
        with timer.stage("crrn"):
            out = executor.network("crrn", x)
        with timer.stage("download"):
            background = np.clip(executor.download(out["background"]), 0.0, 1.0)
            if not intermediates:
                return Layers(background=background, reflection=image - background)
            reflection = executor.download(out["reflection"])
            gradient = executor.download(out["gradient"])[:, :, 0]
        return Layers(background=background, reflection=reflection, gradient=gradient)
