"""mkdocs hook: links from docs/ to files outside it (``../torch_ppl/reference.py``) work on
GitHub as they are; on the site they become links to the repository, so that
``mkdocs build --strict`` can keep rejecting every other broken link."""
from __future__ import annotations

import posixpath
import re

_LINK = re.compile(r"(\]\()(\.\./[^)\s#]+)(#[^)\s]*)?(\))")


def on_page_markdown(markdown, page, config, files):
    base = config["repo_url"].rstrip("/") + "/blob/main/"
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match):
        target = posixpath.normpath(posixpath.join("docs", page_dir, match.group(2)))
        if target.startswith(".."):
            return match.group(0)  # leaves the repository: let mkdocs report it
        return f"{match.group(1)}{base}{target}{match.group(3) or ''}{match.group(4)}"

    return _LINK.sub(rewrite, markdown)
