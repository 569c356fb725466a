"""The search spec: its fields and sections, the space of PEFT settings, the rules between keys, the checks
against the data and model, YAML reading, the conversion to trial settings, and `validate`."""
from search.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "SearchSpec": "search_spec", "SpecError": "fields", "load_spec": "search_spec", "parse_spec": "search_spec",
    "check_file": "validate", "validate_file": "validate", "secret_free_dumps": "redact",
})
