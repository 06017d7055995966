"""The fuzz suite: hostile images through every reader, hostile OCI v1 tars through import.

Each case takes a small, valid seed image (plain, ``-c``, or a delta built with ``-b``),
changes one file of it, and runs the commands a user would on the result, each under a
memory cap (RLIMIT_AS) and a timeout, in long-lived worker processes:

- **targets**: index.json, oci-layout, the manifest, the config, the rootfs, the chunk
  blobs; and the kind of file each is (a FIFO, a symlink to /dev/zero, a 3 GB sparse
  file, a directory, a device, missing).
- **mutations**: byte-level (bit flips, interesting values, truncation, insertion...)
  and structure-aware (the rootfs decoded with the schema, one field changed, encoded
  again; the JSON parsed, one value changed; a seek table rewritten). The changed blob
  is either left under its old name (``unfixed``: its sha256 no longer matches, the
  check must refuse it) or stored under its new digest with every reference to it
  updated up to index.json (``fixed``: the change reaches the parsers).
- **commands**: ``verify`` (sometimes with ``--digest``), ``extract``, ``export``, all
  through ``puzzlefs.cli.main`` in the worker; and, when running as root with
  /dev/fuse, for a share of the cases, ``puzzlefs mount`` (the CLI), a walk reading
  every file, link and xattr, and ``puzzlefs umount``.
- **import**: hostile OCI v1 images of tar layers (members with hostile names, types,
  devices, links, sparse maps, pax records; tar and gzip bytes; JSON), through
  ``puzzlefs import --max-layer-size 32M``; an import that succeeds must extract.

Every outcome is classified: accepted, clean error (exit 1 or 2, one ``Error:`` line),
internal error (exit 70, a traceback, or any other stderr), hang (timeout), crash (the
worker or daemon died of a signal), memory-capped (MemoryError under the cap), writes
outside the target, lost tags and missing blobs (the store changed under a reader),
leaked descriptors. Only the first two are acceptable.

    python3 -m tests.fuzz                       # the CI slice: seed 1, 2400 cases
    python3 -m tests.fuzz --cases 100000 --seed 7 --jobs 2
    python3 -m tests.fuzz --seed 7 --case 1234 --keep /tmp/case   # reproduce one case

The CI slice also runs as ``tests/fuzz/test_fuzz.py``.
"""
