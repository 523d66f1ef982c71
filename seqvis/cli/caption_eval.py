"""Re-run the captioning final evaluation of a trained workdir from its newest checkpoint.

    python -m seqvis.cli.caption_eval --workdir=DIR [--kv_cache=false]

The new values are merged into ``DIR/results.json``; ``--kv_cache=false`` decodes the transformer
without the key/value cache (the reference path).
"""

from __future__ import annotations

import argparse
import json

from seqvis.tasks.captioning import evaluate_workdir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Re-run the captioning final evaluation of a trained workdir.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--kv_cache", choices=("true", "false"), default=None,
                   help="transformer decoder: decode with the key/value cache or without it (the reference "
                        "path); default: the workdir's config.decode.kv_cache")
    a = p.parse_args(argv)
    out = evaluate_workdir(a.workdir, None if a.kv_cache is None else a.kv_cache == "true")
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, (dict, list))}, indent=1))


if __name__ == "__main__":
    main()

