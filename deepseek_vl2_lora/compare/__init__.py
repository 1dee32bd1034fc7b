"""Compare runs (e.g. freezing policies): a markdown table and a PNG of loss and accuracy curves
(`scripts/compare.py`). Reading runs (`runs`: run dirs, sweep dirs, eval.json files, W&B), the table (`table`), the
plot (`plot`) and the report and its command line (`report`). Imports `training` for the sweep metadata."""

from .. import lazy_exports

_EXPORTS = {
    "CompareError": "runs",
    "RunData": "runs",
    "load_paths": "runs",
    "load_run": "runs",
    "load_wandb": "runs",
    "Row": "table",
    "aggregate_table": "table",
    "build_rows": "table",
    "markdown_table": "table",
    "plot": "plot",
    "main": "report",
    "write_report": "report",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
