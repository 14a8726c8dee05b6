"""A directory laid out as the kubelet lays out a mounted ConfigMap or Secret: `..<timestamp>/<file>`, a
`..data` symlink to it, and `<file> → ..data/<file>`. An update swaps `..data` atomically: the file
itself is never written, which is what a watch on the file would miss."""

from __future__ import annotations

import os


class MountedVolume:
    def __init__(self, root, filename: str) -> None:
        self.root, self.filename, self.n = root, filename, 0
        root.mkdir(parents=True, exist_ok=True)

    def write(self, content: str) -> str:
        """Publish a new version of the file; returns the path an app reads it at."""
        self.n += 1
        d = self.root / f"..2026_12_01_00_00_{self.n:04d}"
        d.mkdir()
        (d / self.filename).write_text(content)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(d.name)
        os.replace(tmp, self.root / "..data")
        link = self.root / self.filename
        if not link.is_symlink():
            link.symlink_to(f"..data/{self.filename}")
        return str(link)
