"""Pydantic validation errors as the platform reports them: each problem with its
field and the fix, for HTTP bodies and for the runtime's node input errors alike."""

from __future__ import annotations

from typing import Any

_FIXES = {
    "missing": "add the field",
    "string_too_short": "send a non-empty value",
    "string_too_long": "send at most {max_length} characters",
    "too_short": "send at least {min_length} item(s)",
    "too_long": "send at most {max_length} item(s); split larger batches",
    "greater_than_equal": "use a value >= {ge}",
    "less_than_equal": "use a value <= {le}",
    "greater_than": "use a value > {gt}",
    "finite_number": "send a finite number (not NaN or infinity)",
    "literal_error": "use one of {expected}",
    "extra_forbidden": "remove the field",
    "json_invalid": "send a valid JSON body",
    "value_error": "change the value as the error says",
}


def field_errors(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Pydantic errors -> [{field, error, fix}], dropping FastAPI's 'body' prefix."""
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        ctx = {k: v for k, v in (err.get("ctx") or {}).items()}
        template = _FIXES.get(err.get("type", ""), "send a value of type {type}")
        try:
            fix = template.format(type=err.get("type", "?").split("_")[0], **ctx)
        except (KeyError, IndexError):
            fix = template
        out.append({"field": ".".join(loc) or "(body)", "error": err.get("msg", ""), "fix": fix})
    return out
