"""The one error the merge library raises for bad input: `MergeError`, with a readable reason.

It subclasses `ValueError` so callers that already map `ValueError` to a 4xx keep working; the
API layer can show `str(err)` as is (it names the adapter, module, field or limit at fault).
"""

from __future__ import annotations


class MergeError(ValueError):
    """Adapters that cannot be read or merged as asked (the message says which and why)."""
