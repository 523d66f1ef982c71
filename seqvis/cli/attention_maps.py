"""Per-word attention maps of a trained captioning workdir, one PNG per image.

    python -m seqvis.cli.attention_maps --workdir=DIR [--num_images=8] [--out=DIR/attention_maps] [--split=SPLIT]
"""

from __future__ import annotations

from seqvis.analysis.attention_maps import render_workdir
from seqvis.cli import pictures


def main(argv=None) -> None:
    pictures.run(argv, "Per-word attention maps of a trained captioning workdir.", render_workdir, "attention_maps", "num_images")


if __name__ == "__main__":
    main()
