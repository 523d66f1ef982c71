"""Attention rollout and last-layer maps of a trained ViT workdir, one PNG per image and an overview.

    python -m seqvis.cli.vit_maps --workdir=DIR [--images=8] [--out=DIR/vit_maps] [--split=SPLIT]
"""

from __future__ import annotations

from seqvis.analysis.vit_maps import render_workdir
from seqvis.cli import pictures


def main(argv=None) -> None:
    pictures.run(argv, "Attention rollout and last-layer maps of a trained ViT workdir.", render_workdir, "vit_maps", "images")


if __name__ == "__main__":
    main()
