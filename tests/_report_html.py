"""Parse a transferkit report.html into its sections, tables and embedded figures (test helper)."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.external: list[str] = []
        self._section: str | None = None
        self._table: dict | None = None
        self._row: list | None = None
        self._cell: list | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            v = a.get(key)
            if v and not v.startswith(("data:", "#")):
                self.external.append(v)
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.external.append(f"<{tag}>")
        if tag == "section" and a.get("id"):
            self._section = a["id"]
            self.sections[self._section] = {"tables": [], "images": []}
        elif self._section is None:
            return
        elif tag == "table":
            self._table = {"class": a.get("class", ""), "rows": []}
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            src = a.get("src", "")
            prefix = "data:image/png;base64,"
            data = base64.b64decode(src[len(prefix):]) if src.startswith(prefix) else b""
            self.sections[self._section]["images"].append({"class": a.get("class", ""), "png": data})

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self._table["rows"].append(self._row)
            self._row = None
        elif tag == "table" and self._table is not None and self._section is not None:
            self.sections[self._section]["tables"].append(self._table)
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._section is not None:
            self.text.append(data)


def parse_report(html: str) -> _ReportParser:
    p = _ReportParser()
    p.feed(html)
    p.close()
    return p


def tables(parsed: _ReportParser, section: str, cls: str) -> list[dict]:
    return [t for t in parsed.sections[section]["tables"] if cls in t["class"].split()]


def assert_pngs(images: list[dict], min_count: int = 1) -> None:
    assert len(images) >= min_count, f"expected ≥ {min_count} figures, found {len(images)}"
    for img in images:
        assert img["png"].startswith(PNG_MAGIC) and len(img["png"]) > 2000, "figure is not an embedded PNG"
