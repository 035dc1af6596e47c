"""Make the README's before/after figure from the package's public-domain sample.

The sample (``sdk/assets/sample_glass.jpg``, made by ``docs/make_sample.py``) mixes two
public-domain pictures with the project's synthesis, so the clean background is known.
Run from the repository root:  python docs/make_figures.py [--model NAME_OR_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
from dereflect.imageio import read_image
from dereflect.models import BUNDLED_MODELS
from dereflect.remover import Remover
from dereflect.tools.evaluate import contact_row, contact_sheet
from dereflect.tools.metrics import psnr, ssim

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "sdk" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", action="append", default=None,
                        help="bundled model name or export directory; repeatable (default: every bundled model)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "before_after.png"))
    args = parser.parse_args()
    image, _ = read_image(ASSETS / "sample_glass.jpg")
    clean, _ = read_image(ASSETS / "sample_glass_clean.jpg")
    rows = []
    for model in args.model or BUNDLED_MODELS:
        remover = Remover.load(model)
        result = remover.remove_with_intermediates(image, colour_order="RGB")
        caption = (f"{remover.manifest.name}: PSNR {psnr(image, clean):.2f} -> {psnr(result.background, clean):.2f} "
                   f"dB, SSIM {ssim(image, clean):.3f} -> {ssim(result.background, clean):.3f}")
        rows.append((caption, contact_row(image, result, clean, tile=256)))
        print(caption)
    cv2.imwrite(args.out, cv2.cvtColor(contact_sheet(rows, tile=256), cv2.COLOR_RGB2BGR))
    print(args.out)


if __name__ == "__main__":
    main()
