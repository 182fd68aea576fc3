"""Entry point of a load-benchmark subprocess: ``python -m peftlab.serve.bench.worker JOB.json RESULT.json``.

Runs one cell (:func:`peftlab.serve.bench.cells.run_cell`) in this fresh process, so that its memory
high-water mark and allocator state belong to that cell alone, and writes the result as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    """Run the job of ``argv[0]`` and write its result to ``argv[1]``."""
    job_file, out_file = argv
    from peftlab.serve.bench.cells import run_cell

    result = run_cell(json.loads(Path(job_file).read_text()))
    Path(out_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
