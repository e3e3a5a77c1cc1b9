"""Pipeline stage ``report``: ``summary.json`` and the self-contained ``report.html`` (last of all stages)."""

from __future__ import annotations

from ..stage import Stage, register_stage


class ReportStage(Stage):
    """Write summary.json and report.html: every stage's section, predicted vs measured."""

    name, order = "report", 100

    def run(self, run) -> dict:
        from ...io import write_json
        from ...report import write_report

        summary = run.summary()
        write_json(run.out / "summary.json", summary)
        path = write_report(summary, run.out, figures_dir=run.out / "report")
        return {"report": str(path.relative_to(run.out))}


register_stage(ReportStage())
