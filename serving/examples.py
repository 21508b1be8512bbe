"""Write the web page's example images (serving/static/examples/): scikit-image's bundled photos,
made small and JPEG-compressed the way old web images are, so there is something to restore.

    python -m serving.examples
"""

from __future__ import annotations

from pathlib import Path

import cv2
from skimage import data

EXAMPLES = Path(__file__).with_name("static") / "examples"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # names of skimage.data's RGB photos
LONG_SIDE = 256
QUALITY = 60


def write_examples(out: Path = EXAMPLES) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        rgb = getattr(data, name)()
        scale = LONG_SIDE / max(rgb.shape[:2])
        small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        path = out / f"{name}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
        paths.append(path)
    return paths


if __name__ == "__main__":
    for path in write_examples():
        print(path, path.stat().st_size, "bytes")
