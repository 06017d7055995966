"""PuzzleFS: content-defined chunked, de-duplicated, reproducible container images.

The Python API::

    from puzzlefs import build, open_image, extract

    result = build("rootfs/", "oci/", "v1", compress=True)
    image = open_image("oci/", "v1", verity_digest=result.manifest_verity)
    extract(image, "out/")

The names are imported on first use, so that ``import puzzlefs`` (and the command
line, which starts with it) stays cheap.
"""

# Nothing imported at the top, not even __future__ or typing (an import is a window of
# milliseconds): the command's start-up runs through here before it can set up its
# signal handling (see puzzlefs.__main__).
TYPE_CHECKING = False  # typing.TYPE_CHECKING, which mypy also sees as True

__version__ = "0.1.0"

__all__ = ["BuildResult", "Image", "PuzzleFSError", "build", "extract", "open_image"]

_WHERE = {
    "BuildResult": "puzzlefs.builder",
    "build": "puzzlefs.builder",
    "PuzzleFSError": "puzzlefs.errors",
    "extract": "puzzlefs.extract",
    "Image": "puzzlefs.reader",
    "open_image": "puzzlefs.reader",
}

if TYPE_CHECKING:
    from typing import Any

    from puzzlefs.builder import BuildResult, build
    from puzzlefs.errors import PuzzleFSError
    from puzzlefs.extract import extract
    from puzzlefs.reader import Image, open_image


def __getattr__(name: str) -> "Any":
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'puzzlefs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
