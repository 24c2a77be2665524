"""Stage `report`: reports/report.md, a self-contained reports/report.html and reports/figures/*.png.

Reads every dataset's evaluate and generate outputs (a missing one is an error naming the stage
to run) and, if present, results/<dataset>/generation/baseline_metrics.json (an earlier run's
sample statistics to compare with), every stage's wall time, the human-evaluation votes if any,
and the run's provenance (git, with dvc.yaml telling pipeline outputs from code); pipeline.reporting.report
renders them and checks the paper's claims (pipeline.reporting.claims). Each output is written atomically.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.core.io import atomic_output, write_text
from pipeline.core.paths import ReportPaths


def run(params: Path, root: Path = Path(".")) -> dict:
    from pipeline.reporting import report
    from pipeline.reporting.sections import dataset_claims

    started = time.perf_counter()
    inputs = report.collect(Path(params), Path(root))
    built = report.build(inputs)
    paths = ReportPaths(root)
    with atomic_output(paths.figures, directory=True) as tmp:
        for name, png in built.figures.items():
            (tmp / name).write_bytes(png)
    write_text(paths.markdown, built.markdown)
    write_text(paths.html, built.html)
    return {
        "datasets": [d.name for d in inputs.datasets],
        "markdown": str(paths.markdown),
        "html": str(paths.html),
        "figures": sorted(str(paths.figures / name) for name in built.figures),
        "table2": inputs.human_eval.markdown is not None,
        "claims": {d.name: {c.claim: c.verdict for c in dataset_claims(d)} for d in inputs.datasets},
        "git_revision": inputs.provenance.git_revision,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
