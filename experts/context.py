"""Expert results -> prompt text, and truncation to a budget measured by the caller's counter.

The server places the text (the Alpaca template's `### Input:` field for LLaMA-Adapter checkpoints, a
context message for chat-template models) and passes a token counter; this module knows nothing of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from experts.base import ExpertResult

TRUNCATION_MARKER = "[…truncated]"
CHAT_HEADER = "Context from automatic image analysis (may contain mistakes):"


def format_context(results: Iterable[ExpertResult], header: str | None = None) -> str:
    """Join the text of the experts that succeeded, one block per expert, in the given order.

    Failed or empty results contribute nothing; with no text at all the result is "" (and no header).
    """
    blocks = [r.text.strip() for r in results if r.ok and r.text.strip()]
    if not blocks:
        return ""
    return "\n".join([header, *blocks] if header else blocks)


def truncate_to_budget(
    text: str, budget: int, count: Callable[[str], int], marker: str = TRUNCATION_MARKER
) -> str:
    """The longest prefix of `text` (cut at a word boundary where possible) + marker with count <= budget.

    `text` is returned unchanged when it fits; "" when not even the marker fits. The result never exceeds
    the budget, even for counters that are not monotone in the prefix length (each candidate is checked).
    """
    if count(text) <= budget:
        return text

    def candidate(n: int) -> str:
        head = text[:n].rstrip()
        if not head:
            return marker
        return head + ("\n" if text[len(head):len(head) + 1] == "\n" else " ") + marker

    if count(marker) > budget:
        return ""
    lo, hi = 0, len(text) - 1  # invariant: candidate(lo) fits (candidate(0) == marker); the full text does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(candidate(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    cut = lo
    space = max(text.rfind(" ", 0, cut + 1), text.rfind("\n", 0, cut + 1))
    if cut < len(text) and not text[cut].isspace() and space > 0 and count(candidate(space)) <= budget:
        cut = space  # do not end on half a word
    return candidate(cut)
