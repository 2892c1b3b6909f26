"""Regenerate layerlie/assets from scikit-image's bundled sample photos.

Each photo is converted to RGB (grayscale repeated on 3 channels), its
shorter side resized to 256 px, and saved as JPEG. Run once; the output is
committed so that layerlie needs no download.
"""

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

NAMES = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
         "retina", "camera", "coins", "brick", "grass", "gravel"]
OUT = Path(__file__).resolve().parents[1] / "layerlie" / "assets"


def main() -> None:
    for name in NAMES:
        img = np.asarray(getattr(data, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        pil = Image.fromarray(img[..., :3].astype(np.uint8))
        scale = 256 / min(pil.size)
        pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.LANCZOS)
        pil.save(OUT / f"{name}.jpg", quality=92)


if __name__ == "__main__":
    main()
