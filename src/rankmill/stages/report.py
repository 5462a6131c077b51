"""The ``report`` stage: the run's HTML report (:mod:`rankmill.report`) as the last step of a
pipeline.

Its ``finalize`` step renders the report once every earlier stage is committed, commits it
as the step's file ``report.html`` and copies it to ``<run-dir>/report.html``. It re-renders
when what it reads (labels, negatives, the export's files) changes::

    stages:
      export: {}
      report: {}
"""

from __future__ import annotations

import os
from typing import ClassVar

import pyarrow as pa

from rankmill.manifest import RunDir
from rankmill.schemas import LABELS, NEGATIVES
from rankmill.stage import Stage, StepContext, StepOutput, UnitOutput, WorkUnit, content_key
from rankmill.stages.export import FILES


class ReportStage(Stage):
    name = "report"
    version = "1"
    optional_inputs: ClassVar[dict[str, pa.Schema]] = {
        "labels": LABELS,
        "negatives": NEGATIVES,
        "files": FILES,
    }

    def plan_inputs(self) -> dict[str, list[str] | None] | None:
        return {}

    def plan(self, inputs: dict[str, pa.Table]) -> list[WorkUnit]:
        return [WorkUnit("00000", content_key("report"))]

    def process(self, unit: WorkUnit) -> UnitOutput:
        return UnitOutput(tables={})

    def finalize(self, step: StepContext) -> StepOutput:
        from rankmill.report import render_html, run_summary

        page = render_html(run_summary(self.ctx.run_dir)).encode()
        path = os.path.join(step.work_dir, "report.html")
        with open(path, "wb") as f:
            f.write(page)
        rd = RunDir(self.ctx.run_dir)
        rd.write_atomic(rd.path("report.html"), page)
        return StepOutput(files={"report.html": path})
