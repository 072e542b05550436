"""``mcf report``: one run's results as a self-contained HTML page, and a markdown summary of it.

``markdown_summary`` is light (no plotting) so the Prefect flow can import it.
"""

from __future__ import annotations

from mcf.report.runfiles import markdown_summary

__all__ = ["markdown_summary"]
