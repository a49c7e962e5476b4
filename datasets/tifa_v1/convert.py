"""Convert the TIFA v1.0 text inputs (upstream `tifa_v1.0/tifa_v1.0_text_inputs.json`) into `datasets/tifa_v1.jsonl`.

Run once from the project root: `python datasets/tifa_v1/convert.py ../shared/data/tifa/tifa_v1.0_text_inputs.json`.
Ids and captions are kept verbatim (TIFA's questions are keyed by the id and carry the caption); any other shape
of the file stops the conversion.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

SOURCES = {"coco": 2000, "partiprompt": 1420, "paintskill": 500, "drawbench": 161}


def convert(source: Path, target: Path) -> None:
    rows = []
    for entry in json.loads(source.read_text()):
        extra_fields = set(entry) - {"id", "caption", "coco_val_id"}
        if extra_fields or not entry["caption"].strip():
            raise ValueError(f"unexpected entry {entry!r}")
        origin = entry["id"].rsplit("_", 1)[0]
        extra = {"source": origin, **({"coco_val_id": entry["coco_val_id"]} if "coco_val_id" in entry else {})}
        rows.append({"id": entry["id"], "prompt": entry["caption"], "extra": extra})
    counts = dict(collections.Counter(row["extra"]["source"] for row in rows))
    if counts != SOURCES:
        raise ValueError(f"expected sources {SOURCES}, got {counts}")
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {target}")


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(__file__).resolve().parent.parent / "tifa_v1.jsonl")
