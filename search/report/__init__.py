"""What a search leaves for people: report.md and report.html built from one list of document blocks, their
plots, the run directory's outputs rebuilt from the storage (trials.csv, best/), and adapter export."""
from search.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "ReportInput": "sections", "build_report": "sections", "build_html": "html", "refresh": "outputs",
    "export_adapter": "export", "ExportError": "export",
})
