"""Make the package's sample photo: public-domain pictures mixed by the project's own synthesis.

Background: scikit-image's ``coffee`` (CC0, Rachel Michetti). Reflection: scikit-image's
``astronaut`` (NASA, public domain). Run from the repository root with the train and dev
extras installed:  python docs/make_sample.py
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from dereflect.train.synthesis import SynthesisConfig, synthesize
from skimage import data

ASSETS = Path(__file__).resolve().parent.parent / "sdk" / "assets"


def main() -> None:
    background = data.coffee().astype(np.float32) / 255.0
    height, width = background.shape[:2]
    reflection = cv2.resize(data.astronaut(), (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    recipe = SynthesisConfig.rm2s_stage2(reflection_weight=(0.45, 0.45), background_scale=(0.1, 0.1),
                                         blur_sigma=(1.0, 1.0), vignette=False)
    mixture, clean, _ = synthesize(background, reflection, recipe, np.random.default_rng(2026))
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name, image in (("sample_glass.jpg", mixture), ("sample_glass_clean.jpg", clean)):
        bgr = cv2.cvtColor((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(ASSETS / name), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
        print(ASSETS / name)


if __name__ == "__main__":
    main()
