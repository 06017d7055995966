"""The FUSE layer: the kernel protocol spoken on /dev/fuse (:mod:`.session`, with the
message layouts in :mod:`._abi`), making and removing mounts (:mod:`.kernel`), and the
puzzlefs filesystem served through it (:mod:`.filesystem`)."""
