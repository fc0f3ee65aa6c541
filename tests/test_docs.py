"""The documentation's references: every relative link resolves, every cited raw result exists, and
`docs/results/` holds only files that some document cites."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
RESULT_SUFFIXES = (".log", ".json", ".txt", ".md")


def _expanded(token: str) -> list[str]:
    """`a_{1,2}.json` -> `a_1.json`, `a_2.json` (one brace group, as the docs write them)."""
    match = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", token)
    if match is None:
        return [token]
    head, choices, tail = match.groups()
    return [head + choice + tail for choice in choices.split(",")]


def _code_tokens() -> list[tuple[Path, str]]:
    return [(doc, name) for doc in DOCUMENTS for token in CODE.findall(doc.read_text()) for name in _expanded(token)]


def test_relative_links_resolve():
    broken = []
    for doc in DOCUMENTS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_cited_results_exist():
    missing = []
    for doc, token in _code_tokens():
        if "docs/results/" in token and not (ROOT / token[token.index("docs/results/") :]).exists():
            missing.append(f"{doc.relative_to(ROOT)}: {token}")
    assert not missing, missing


def test_every_raw_result_is_cited():
    cited: set[Path] = set()
    names: set[str] = set()
    for _, token in _code_tokens():
        if "docs/results/" in token:
            path = ROOT / token[token.index("docs/results/") :]
            if path.is_dir() and path.resolve() != RESULTS:  # a folder of results cited as a whole
                cited.update(path.rglob("*"))
            cited.add(path)
        elif token.endswith(RESULT_SUFFIXES):
            cited.add(RESULTS / token)  # a path inside docs/results/
            names.add(token)  # or a file's name
    uncited = [
        str(path.relative_to(RESULTS))
        for path in sorted(RESULTS.rglob("*"))
        if path.is_file() and path not in cited and path.name not in names
    ]
    assert not uncited, uncited
