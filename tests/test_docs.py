"""The documentation: the mkdocs site builds without a warning, the README stays a short
page whose links lead somewhere, and every RINGLIB_* variable the code reads is documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ENVIRONMENT_PAGE = ROOT / "docs" / "environment.md"
README_MAX_LINES = 300
# The package's code: what users run, so what docs/environment.md must cover.
CODE_FOLDERS = ("ringlib", "transport", "collectives", "runtime")
VARIABLE = re.compile(r"\bRINGLIB_[A-Z0-9_]*[A-Z0-9]\b")
# [text](target) and ![alt](target), with an optional "title"; and [label]: target.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)


def test_the_docs_build_with_mkdocs_strict(tmp_path):
    site = tmp_path / "site"
    had_site = (ROOT / "site").exists()  # `make docs` builds there
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                            "--site-dir", str(site)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, (
        f"mkdocs build --strict failed (exit {build.returncode}); `make test` installs the "
        f"docs extra.\n{build.stderr}{build.stdout}")
    assert (site / "index.html").is_file()
    assert (site / "api" / "ring" / "index.html").read_text().count(
        "ringlib.runtime.ring.Ring.all_reduce") > 0, "the API page lost Ring.all_reduce"
    assert had_site or not (ROOT / "site").exists(), "the build wrote into the repository"


def _relative_targets(markdown: str) -> list[str]:
    """The link and image targets of `markdown` that point into the repository."""
    without_code = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    without_code = re.sub(r"`[^`\n]*`", "", without_code)
    targets = INLINE_LINK.findall(without_code) + REFERENCE_LINK.findall(without_code)
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#|//)", t, re.I)]


def test_the_readme_is_one_short_page_whose_links_lead_to_files():
    text = README.read_text()
    lines = text.count("\n") + (not text.endswith("\n"))
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; keep it under {README_MAX_LINES} and move depth "
        "into docs/")
    targets = _relative_targets(text)
    assert targets, "found no relative links in README.md"
    missing = sorted({t for t in targets
                      if not (ROOT / t.split("#", 1)[0].split("?", 1)[0]).exists()})
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_every_ringlib_variable_in_the_code_is_documented():
    found: dict[str, set[str]] = {}
    for folder in CODE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in VARIABLE.findall(path.read_text()):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert "RINGLIB_RANK" in found, "the scan found none of the variables it should"
    documented = set(VARIABLE.findall(ENVIRONMENT_PAGE.read_text()))
    missing = {name: sorted(where) for name, where in sorted(found.items())
               if name not in documented}
    assert not missing, ("variables read in the code but absent from docs/environment.md "
                         f"(name: where): {missing}")
