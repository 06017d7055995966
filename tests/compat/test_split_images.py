"""Images beyond the manifest limit, against the reference: the tag names an image
index, which the reference cannot read; a tag naming the index's first manifest (the
image's own: rootfs, times and the chunks that fit) it reads whole, since it finds
chunks by digest in the store, not through the manifest's layers."""

from __future__ import annotations

import json
import os
import random

from refutil import Jail

from puzzlefs import build
from puzzlefs.digest import Digest
from puzzlefs.oci import MEDIA_TYPE_INDEX, ImageLayout


def test_reference_reads_a_split_image_through_its_first_manifest(jail: Jail) -> None:
    src = jail.path("/split-src")
    src.mkdir()
    rnd = random.Random(3)
    for i in range(6):
        (src / f"f{i}").write_bytes(rnd.randbytes(200_000))
    os.symlink("f0", src / "link")
    oci = jail.path("/split")
    result = build(src, oci, "v1", manifest_limit=2_000)
    assert result.manifest.media_type == MEDIA_TYPE_INDEX
    layout = ImageLayout(oci)
    index = json.loads(layout.blobs.get(result.manifest.digest))
    first = index["manifests"][0]
    layout.set_tag("first", Digest.parse(first["digest"]), first["size"])

    done = jail.extract("/split:v1", "/out-index")
    assert done.returncode != 0  # an index: not something the reference reads

    done = jail.extract("/split:first", "/out-first")
    assert done.returncode == 0, done.stderr
    out = jail.path("/out-first")
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))
    for i in range(6):
        assert (out / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()
    assert os.readlink(out / "link") == "f0"
