"""PuzzleFS: content-defined chunked, de-duplicated, reproducible container images.

The Python API::

    from puzzlefs import build, open_image, extract

    result = build("rootfs/", "oci/", "v1", compress=True)
    image = open_image("oci/", "v1", verity_digest=result.manifest_verity)
    extract(image, "out/")
"""

__version__ = "0.1.0"

from puzzlefs.builder import BuildResult, build  # noqa: E402
from puzzlefs.errors import PuzzleFSError  # noqa: E402
from puzzlefs.extract import extract  # noqa: E402
from puzzlefs.reader import Image, open_image  # noqa: E402

__all__ = ["BuildResult", "Image", "PuzzleFSError", "build", "extract", "open_image"]
