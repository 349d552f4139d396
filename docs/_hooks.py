"""MkDocs hook: keep `mkdocs build --strict` strict about real cross-references only.

Docstrings write tensor shapes the way the code comments do, e.g. "texts of [P][N]", which Markdown
reads as a reference-style link to a target named "N". mkdocs-autorefs then warns that it cannot
find "N", and strict mode fails on it. A cross-reference to the API is always a dotted Python path
(``posterior.rewards.base.Sentiment``), so only warnings about targets without a dot are dropped;
a broken reference to a real dotted name still fails the build.
"""

import logging
import re

_UNRESOLVED = re.compile(r"Could not find cross-reference target '([^'.]*)'$")


class _ShapeNotation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _UNRESOLVED.search(record.getMessage())


def on_startup(**kwargs) -> None:
    logging.getLogger("mkdocs.plugins.mkdocs_autorefs._internal.plugin").addFilter(_ShapeNotation())
