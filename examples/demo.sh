#!/usr/bin/env bash
# A small demo: make a tree, build it (plain and compressed), print the digests,
# extract it again and check that nothing changed.
set -euo pipefail
work=${1:-$(mktemp -d /tmp/puzzlefs-demo.XXXXXX)}
mkdir -p "$work/rootfs/etc" "$work/rootfs/usr/bin" "$work/rootfs/var/empty"
printf 'NAME="puzzlefs demo"\n' > "$work/rootfs/etc/os-release"
head -c 3000000 /dev/urandom > "$work/rootfs/usr/bin/big-binary"
seq 1 200000 > "$work/rootfs/usr/bin/numbers.txt"
ln -sf ../usr/bin/numbers.txt "$work/rootfs/etc/numbers"
ln -f "$work/rootfs/usr/bin/numbers.txt" "$work/rootfs/usr/bin/hardlink.txt"
chmod 4755 "$work/rootfs/usr/bin/big-binary"

echo "== build $work/rootfs into $work/oci (tags demo and demo-zstd)"
puzzlefs build "$work/rootfs" "$work/oci:demo"
puzzlefs build -c "$work/rootfs" "$work/oci:demo-zstd"
echo "== store: $(ls "$work/oci/blobs/sha256" | wc -l) blobs, $(du -sh "$work/oci" | cut -f1)"
echo "== extract both tags and compare with the source"
puzzlefs extract "$work/oci:demo" "$work/out"
puzzlefs extract "$work/oci:demo-zstd" "$work/out-zstd"
diff -r --no-dereference "$work/rootfs" "$work/out"
diff -r --no-dereference "$work/rootfs" "$work/out-zstd"
echo "== identical: the round trip works"
puzzlefs inspect "$work/oci:demo-zstd" | head -8
if [ "$(id -u)" -eq 0 ] && [ -e /dev/fuse ]; then
    echo "== mount it (no extraction), read through the mount, unmount"
    mkdir -p "$work/mnt"
    puzzlefs mount "$work/oci:demo-zstd" "$work/mnt"
    ls -l "$work/mnt/usr/bin"
    cmp "$work/mnt/usr/bin/big-binary" "$work/rootfs/usr/bin/big-binary"
    puzzlefs umount "$work/mnt"
fi
echo "== done (files in $work)"
