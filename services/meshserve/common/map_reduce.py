"""The map-reduce templates as callers write them, checked the same way by the gateway and the aggregator.

Templates use plain placeholders ({chunk}, {outputs}) replaced literally, so braces elsewhere in a
template or in the text need no escaping. An empty template means the default (summarisation).
"""

from __future__ import annotations

from meshserve.common.sampling import Violation

CHUNK_PLACEHOLDER = "{chunk}"
OUTPUTS_PLACEHOLDER = "{outputs}"
DEFAULT_MAP_TEMPLATE = "Summarize the following text in a few sentences.\n\nText:\n{chunk}\n\nSummary:"
DEFAULT_REDUCE_TEMPLATE = (
    "The following are summaries of consecutive parts of one document. "
    "Combine them into one concise summary of the whole document.\n\n{outputs}\n\nSummary:"
)
MAX_TEMPLATE_BYTES = 64 * 1024


def template_violations(map_template: str, reduce_template: str) -> list[Violation]:
    """What is wrong with the caller's templates, by proto field (map_reduce.map_template ...)."""
    violations: list[Violation] = []
    for name, template, placeholder in (
        ("map_template", map_template, CHUNK_PLACEHOLDER),
        ("reduce_template", reduce_template, OUTPUTS_PLACEHOLDER),
    ):
        if template and placeholder not in template:
            violations.append((f"map_reduce.{name}", f"must contain {placeholder} (or be empty for the default)"))
        elif len(template.encode("utf-8")) > MAX_TEMPLATE_BYTES:
            violations.append((f"map_reduce.{name}", f"must be at most {MAX_TEMPLATE_BYTES} bytes"))
    return violations
