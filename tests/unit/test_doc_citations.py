"""Every citation of the project's reference stays inside the repository and lands on a real section.

Code, flag files and docs cite the facts they rely on as ``docs/puffin.md §2.3``, a numbered item as
``§2.1 step 5`` / ``§1.8 item 3`` / ``§9 point 10``, and ranges as ``§1.5-1.7``. These tests scan every
``.py``, ``.md``, ``.sh`` and ``.args`` file of the repository and fail when

* a file points at a document outside the repository (the old external specification file, a path into the
  shared folder beside the checkout, an "according to the spec" citation of a section number, or a decision of the
  external architecture page), or
* a section sign cites a section, or a numbered item of a section, that ``docs/puffin.md`` does not have.

A section exists when ``docs/puffin.md`` has a heading starting with its number (``### 2.3 ...``); its items are the
numbered list entries of that section's own text and the numbers of its direct subsections.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "puffin.md"
SCANNED_SUFFIXES = (".py", ".md", ".sh", ".args")
SKIPPED_DIRECTORIES = {"__pycache__", "build", "dist", "runs", "outputs", "node_modules"}
SECTION_SIGN = "\u00a7"

# Built from pieces so that this file does not cite what it forbids.
OUTSIDE_REFERENCES: Tuple[Tuple[re.Pattern, str], ...] = (
    (re.compile("PUFFIN" + "_SPEC"), "names the external specification file"),
    (re.compile(r"\.\./" + "shared" + r"\b|/work/" + "shared" + r"\b"), "points into a folder outside the repository"),
    (re.compile(r"\b[Ss]pec\s*" + SECTION_SIGN + r"|\b[Ss]pec\s+\d+\.\d+\b"), "cites the external specification"),
    (re.compile(r"\bARCHITECTURE(?:\.md\b| decision)"), "cites the external architecture page"),
)

HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?(?:\s|$)")
ANY_HEADING = re.compile(r"^#{1,6}\s")
NUMBERED_ITEM = re.compile(r"^\s*(\d+)\.\s")
CITATION = re.compile(
    SECTION_SIGN
    + r"\s?(?P<first>\d+(?:\.\d+)*)"
    + r"(?:\s?[-\u2013]\s?" + SECTION_SIGN + r"?(?P<last>\d+(?:\.\d+)*))?"
    + r"(?:\s+(?:step|item|point)s?\s+(?P<item>\d+)(?:\s?[-\u2013]\s?(?P<item_last>\d+))?)?"
)


@dataclass(frozen=True)
class DocSections:
    """The numbered sections of the reference: section number -> its item numbers, and duplicated numbers."""

    items: Dict[str, Set[int]]
    duplicates: Tuple[str, ...]


def parse_sections(text: str) -> DocSections:
    """Numbered headings of a Markdown text (outside fenced code) and the numbered items under each."""
    items: Dict[str, Set[int]] = {}
    duplicates: List[str] = []
    current: Optional[str] = None
    in_code = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        heading = HEADING.match(line)
        if heading:
            current = heading.group(1)
            if current in items:
                duplicates.append(current)
            items.setdefault(current, set())
            parent, _, last = current.rpartition(".")
            if parent in items:
                items[parent].add(int(last))
            continue
        if ANY_HEADING.match(line):
            current = None
            continue
        item = NUMBERED_ITEM.match(line)
        if item and current is not None:
            items[current].add(int(item.group(1)))
    return DocSections(items, tuple(duplicates))


def _section_range(first: str, last: Optional[str]) -> List[str]:
    """Sections a citation names: one, every section of a range with a common parent, or the two ends."""
    if last is None:
        return [first]
    first_parent, _, first_number = first.rpartition(".")
    last_parent, _, last_number = last.rpartition(".")
    if first_parent == last_parent and int(first_number) <= int(last_number):
        prefix = first_parent + "." if first_parent else ""
        return [prefix + str(number) for number in range(int(first_number), int(last_number) + 1)]
    return [first, last]


def citation_problems(text: str, sections: DocSections) -> List[Tuple[int, str, str]]:
    """(line, cited text, what is missing) for every section-sign citation that ``sections`` cannot resolve."""
    problems = []
    for match in CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        cited = " ".join(match.group(0).split())
        missing = [number for number in _section_range(match.group("first"), match.group("last"))
                   if number not in sections.items]
        if missing:
            problems.append((line, cited, "no section " + ", ".join(missing)))
            continue
        if match.group("item") is not None:
            first_item = int(match.group("item"))
            last_item = int(match.group("item_last") or first_item)
            absent = [n for n in range(first_item, last_item + 1) if n not in sections.items[match.group("first")]]
            if absent:
                problems.append((line, cited, f"section {match.group('first')} has no item "
                                 + ", ".join(map(str, absent))))
    return problems


def outside_references(text: str) -> List[Tuple[int, str, str]]:
    """(line, matched text, why) for every reference to a document outside the repository."""
    found = []
    for pattern, why in OUTSIDE_REFERENCES:
        for match in pattern.finditer(text):
            found.append((text.count("\n", 0, match.start()) + 1, match.group(0), why))
    return sorted(found)


def scanned_files(root: Path = REPO) -> Iterator[Path]:
    """Source and documentation files of the repository (hidden folders and build outputs left out)."""
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(
            name for name in subdirectories
            if not name.startswith(".") and name not in SKIPPED_DIRECTORIES and not name.endswith(".egg-info")
        )
        for name in sorted(files):
            if name.endswith(SCANNED_SUFFIXES):
                yield Path(directory) / name


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _report(rows: List[str], fix: str) -> str:
    return f"{len(rows)} problem(s); {fix}:\n" + "\n".join(rows)


# --- the repository --------------------------------------------------------------------------------------------------

def test_reference_has_unique_numbered_sections():
    sections = parse_sections(_read(DOC))
    assert not sections.duplicates, f"docs/puffin.md numbers these sections twice: {sections.duplicates}"
    # The top-level chapters every citation family relies on (model, tasks, data, camera, recipe, inference,
    # evaluation, conventions, differences).
    assert {str(number) for number in range(1, 10)} <= set(sections.items), sorted(sections.items)


def test_no_file_cites_a_document_outside_the_repository():
    rows = [
        f"{path.relative_to(REPO)}:{line}: {matched!r} {why}"
        for path in scanned_files()
        for line, matched, why in outside_references(_read(path))
    ]
    assert not rows, _report(rows, "cite docs/puffin.md " + SECTION_SIGN + "X.Y instead (it is the project's copy)")


def test_every_cited_section_exists_in_the_reference():
    sections = parse_sections(_read(DOC))
    rows, citations = [], 0
    for path in scanned_files():
        text = _read(path)
        citations += len(CITATION.findall(text))
        rows += [f"{path.relative_to(REPO)}:{line}: {cited!r}: {why}"
                 for line, cited, why in citation_problems(text, sections)]
    assert citations > 0, "found no section citations at all; the scan is not looking at the repository"
    assert not rows, _report(rows, "give docs/puffin.md that numbered heading or item, or cite one it has")


def _templates_module():
    """``megatron_puffin/data/templates.py`` loaded on its own (it imports nothing heavy; the package would)."""
    spec = importlib.util.spec_from_file_location("_puffin_templates", REPO / "megatron_puffin" / "data" / "templates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_quotes_the_strings_the_code_uses():
    """docs/puffin.md says its prompts and templates are verbatim copies of templates.py; keep it true."""
    templates = _templates_module()
    strings = [
        *templates.CAPTION_PROMPT_HEADS, templates.CAPTION_PROMPT_SUFFIX, templates.THINKING_PROMPT,
        templates.REASONING_PROMPT, templates.CROSS_VIEW_PROMPT_PREFIX, *templates.CROSS_VIEW_PROMPT_TAILS,
        templates.PHOTOGRAPHY_PROMPT, templates.INSTRUCTION_TEMPLATE, templates.SYSTEM_TEMPLATE,
        templates.GENERATION_TEMPLATE, templates.GENERATION_CROSS_TEMPLATE, *templates.SPECIAL_TOKENS,
        templates.CAMERA_SENTENCE_START,
    ]
    doc = " ".join(_read(DOC).split())
    missing = [text for text in strings if " ".join(text.replace("\n", "\\n").split()) not in doc]
    assert len(strings) > 30 and not missing, f"docs/puffin.md does not quote these strings of templates.py: {missing}"


# --- the checker itself --------------------------------------------------------------------------------------------

_S = SECTION_SIGN
_SAMPLE_DOC = """# Title
## 1. Model
### 1.1 First
### 1.2 Second
1. step one
2. step two
```
### 1.3 inside a code block, not a heading
```
### 1.4 Fourth
## 9. Differences
### 9.1 One
### 9.2 Two
"""


def test_checker_resolves_sections_items_and_ranges():
    sections = parse_sections(_SAMPLE_DOC)
    assert sections.items["1"] == {1, 2, 4} and sections.items["1.2"] == {1, 2} and "1.3" not in sections.items
    good = (f"docs/puffin.md {_S}1.2 step 2, {_S}1.1-1.2, {_S}1.1-{_S}1.2, {_S}9 point 2, {_S}1.2 items 1-2, "
            f"({_S}1.4), {_S}9.1{chr(0x2013)}9.2.")
    assert citation_problems(good, sections) == []


def test_checker_reports_missing_sections_and_items():
    sections = parse_sections(_SAMPLE_DOC)
    text = (f"a {_S}1.3\nb {_S}1.2 step 3\nc {_S}1.1-1.4\nd {_S}9 point 3\ne {_S}2\n"
            f"f {_S}1.1{chr(0x2013)}1.3\ng {_S}1-{_S}9\n")
    problems = citation_problems(text, sections)
    assert [(line, why) for line, _, why in problems] == [
        (1, "no section 1.3"),
        (2, "section 1.2 has no item 3"),
        (3, "no section 1.3"),
        (4, "section 9 has no item 3"),
        (5, "no section 2"),
        (6, "no section 1.3"),
        (7, "no section 2, 3, 4, 5, 6, 7, 8"),
    ]
    duplicated = parse_sections(_SAMPLE_DOC + "### 9.2 Again\n")
    assert duplicated.duplicates == ("9.2",)


def test_checker_reports_references_outside_the_repository():
    text = ("see [x](../" + "shared/PUFFIN" + "_SPEC.md)\n"
            f"(spec {_S}2.3) and (Spec {_S}1) and (" + "spec" + " 5.4)\n"
            f"fine: docs/puffin.md {_S}2.3, layer specs, get_dit_layer_spec()\n"
            "(ARCHITECTURE" + " decision 6), ARCHITECTURE" + ".md; fine: SUPPORTED_ARCHITECTURES\n")
    lines = [line for line, _, _ in outside_references(text)]
    assert lines == [1, 1, 2, 2, 2, 4, 4]
