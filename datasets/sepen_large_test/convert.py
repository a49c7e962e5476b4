"""Convert Separate-and-Enhance's `src/concepts/large_test.txt` into `../sepen_large_test.jsonl` (run once).

    python datasets/sepen_large_test/convert.py <path to large_test.txt>

Each line is "a photo of a X and a Y"; the two concepts are its 5th and 8th words, as the released evaluation reads
them (`words[4]`, `words[7]`). They become the row's subjects and two one-word groups.
"""

import hashlib
import json
import sys
from pathlib import Path

source = Path(sys.argv[1])
rows = []
for number, line in enumerate(source.read_text().splitlines()):
    words = line.split()
    if words[:4] != ["a", "photo", "of", "a"] or words[5:7] != ["and", "a"] or len(words) != 8:
        sys.exit(f"{source}:{number + 1}: not 'a photo of a X and a Y': {line!r}")
    rows.append({"id": f"large_test-{number:03d}", "prompt": line, "subjects": [words[4], words[7]],
                 "groups": [[words[4]], [words[7]]]})
out = Path(__file__).resolve().parent.parent / "sepen_large_test.jsonl"
out.write_text("".join(json.dumps(row) + "\n" for row in rows))
print(f"{len(rows)} rows -> {out}; source sha256 {hashlib.sha256(source.read_bytes()).hexdigest()}")
