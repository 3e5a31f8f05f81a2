"""Wording shared by messages that name several things."""
from collections.abc import Sequence


def abbreviate(names: Sequence[str], limit: int) -> str:
    """The first ``limit`` of ``names``, comma-separated, then ``, ... (N in all)`` when there are more."""
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"{', '.join(names[:limit])}{more}"
