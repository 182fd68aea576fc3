"""Entry point of a benchmark subprocess: ``python -m peftlab.bench.worker JOB.json RESULT.json``.

Runs one job of :data:`peftlab.bench.lora.JOBS` in this fresh process (so its memory high-water mark
and allocator state belong to that job alone) and writes the result as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    job_file, out_file = argv
    job = json.loads(Path(job_file).read_text())
    from peftlab.bench.lora import JOBS

    result = JOBS[job["kind"]](job)
    Path(out_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
