"""Docs that stay true (fast, no network): every relative link and `#anchor` of README.md and docs/*.md resolves,
every registered target is in docs/targets.md, every `--flag` of docs/cli.md exists in the CLI parser (under the
subcommand the doc names), and every field of the pipeline spec has an entry in docs/spec.md. Each checker is a
plain function over markdown text, with a self-test that plants the error it must catch."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# a bare repository path with an anchor in prose or a code span, e.g. docs/llm.md#tuning
_BARE = re.compile(r"(?<![\w/.-])((?:docs/)?[\w.-]+\.md)#([\w-]+)")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lowercase, punctuation stripped (but - and _), spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # html tags
    text = text.replace("`", "").lower()
    # GitHub keeps letters, marks, numbers, connector punctuation (_), spaces and hyphens
    kept = (ch for ch in text if ch in " -" or unicodedata.category(ch)[0] in "LMN" or unicodedata.category(ch) == "Pc")
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor of a markdown document: heading slugs (duplicates get -1, -2 ... as on GitHub), html anchors."""
    seen: dict[str, int] = {}
    found = set(_HTML_ANCHOR.findall(text))
    for _, line in _prose_lines(text):
        m = _HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        if slug in seen:
            seen[slug] += 1
            found.add(f"{slug}-{seen[slug]}")
        else:
            seen[slug] = 0
            found.add(slug)
    return found


def broken_links(text: str, doc: Path, repo: Path = REPO, read=None) -> list[str]:
    """Relative links of ``text`` (the markdown of file ``doc``) whose file or #anchor does not exist. Bare
    ``docs/x.md#anchor`` references in prose count too (resolved against the repository root or the doc's folder).
    ``read(path) -> str`` reads a linked markdown file (default: from disk)."""
    read = read or (lambda p: p.read_text(encoding="utf-8"))
    problems = []

    def check(n: int, target: str, anchor: str | None, where: Path) -> None:
        path = where if not target else (where.parent / target)
        if target and not path.exists():
            problems.append(f"{doc.name}:{n}: {target} does not exist")
            return
        if anchor is None:
            return
        if path.suffix != ".md" or path.is_dir():
            return
        body = text if path == doc else read(path)
        if anchor.lower() not in anchors(body):
            problems.append(f"{doc.name}:{n}: #{anchor} is not an anchor of {path.name}")

    for n, line in _prose_lines(text):
        for m in _LINK.finditer(line):
            url = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", url, re.I):  # http:, https:, mailto:
                continue
            target, _, anchor = url.partition("#")
            check(n, target, anchor if "#" in url else None, doc)
        stripped = _LINK.sub("", line)
        for m in _BARE.finditer(stripped):
            target, anchor = m.group(1), m.group(2)
            base = repo / target if target.startswith("docs/") else doc.parent / target
            if not base.exists() and (repo / "docs" / target).exists():
                base = repo / "docs" / target
            if base.exists():
                check(n, "", anchor, base)
            else:
                problems.append(f"{doc.name}:{n}: {target} does not exist")
    return problems


# ---- the CLI ----------------------------------------------------------------------------------------------------

_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
_SPAN = re.compile(r"`([^`\n]+)`")
_QOPS_CMD = re.compile(r"^\s*(?:\$\s*)?(?:[A-Z_]+=\S+\s+)*(?:[\w./-]*/)?qops\s+(?:-v\s+)?([a-z][a-z-]*)")


def _sub_parsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _all_flags(parser) -> set[str]:
    """A parser's flags and those of its nested subcommands (`qops spec validate ...` counts under `spec`)."""
    flags = {o for a in parser._actions for o in a.option_strings}
    for _, sub in _sub_parsers(parser):
        flags |= _all_flags(sub)
    return flags


def parser_flags() -> tuple[set[str], dict[str, set[str]]]:
    """(flags of the top-level parser, flags per subcommand), from qops/cli/parser.py."""
    from qops.cli.parser import build_parser

    class _Any(dict):
        def __missing__(self, key):
            return lambda args: 0

    p = build_parser(_Any())
    top = {o for a in p._actions for o in a.option_strings}
    return top, {name: _all_flags(sp) for name, sp in _sub_parsers(p)}


def unknown_flags(text: str, top: set[str], subs: dict[str, set[str]], prose: bool = True) -> list[str]:
    """`--flags` of a CLI doc that the parser lacks: in a code span or code line starting `qops SUB` (or
    `.venv/bin/qops SUB`, after VAR=value assignments), against SUB's flags; elsewhere (with ``prose``), against
    every flag of the parser."""
    anywhere = top.union(*subs.values())
    problems = []

    def check(n, chunk, sub):
        allowed = top | subs[sub] if sub in subs else anywhere
        for flag in _FLAG.findall(chunk):
            if flag not in allowed:
                problems.append(f"line {n}: {flag} is not a flag of " + (f"`qops {sub}`" if sub in subs else "qops"))

    fenced, pending = False, ""
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:  # code lines, with backslash continuations joined
            pending += line
            if pending.rstrip().endswith("\\"):
                pending = pending.rstrip()[:-1] + " "
                continue
            m = _QOPS_CMD.match(pending)
            if m and m.group(1) not in subs:
                problems.append(f"line {n}: no subcommand `qops {m.group(1)}`")
            if m or prose:
                check(n, pending.split(" #")[0], m.group(1) if m else None)
            pending = ""
            continue
        rest = line
        for span in _SPAN.findall(line):
            m = _QOPS_CMD.match(span)
            if m:
                if m.group(1) not in subs and not m.group(1).startswith("-"):
                    problems.append(f"line {n}: no subcommand `qops {m.group(1)}`")
                check(n, span, m.group(1))
                rest = rest.replace(f"`{span}`", " ", 1)
        if prose:
            check(n, rest, None)
    return problems


# ---- the spec ---------------------------------------------------------------------------------------------------

def spec_fields(model=None, prefix: str = "") -> list[str]:
    """Every field of the pipeline spec as a dotted path (nested models walked, through Optional/list/dict)."""
    import typing

    from pydantic import BaseModel

    from qops.spec import PipelineSpec

    model = model or PipelineSpec

    def models_in(tp):
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            yield tp
        for arg in typing.get_args(tp):
            yield from models_in(arg)

    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        out.append(path)
        for sub in models_in(field.annotation):
            out.extend(spec_fields(sub, path + "."))
    return sorted(set(out))


def yaml_paths(text: str) -> set[str]:
    """Dotted key paths of the ```yaml blocks of a markdown text. A list's items share the list's path; a mapping
    whose values are mappings (target name -> settings) also gives its values' keys without the name, as the spec
    models' ``dict[str, Model]`` fields are walked (``qat.targets.arm64_int8.when`` is also ``qat.targets.when``)."""
    import yaml

    out: set[str] = set()

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{prefix}{key}"
                out.add(path)
                walk(value, path + ".")
                if isinstance(value, dict):
                    for inner in value.values():
                        walk(inner, path + ".")
        elif isinstance(node, list):
            for item in node:
                walk(item, prefix)

    for block in re.findall(r"^```ya?ml[^\n]*\n(.*?)^```", text, re.S | re.M):
        walk(yaml.safe_load(block), "")
    return out


def undocumented_fields(text: str, fields: list[str]) -> list[str]:
    """Fields with no entry in a spec doc: an entry is the field at its place in a ```yaml block (comments do not
    count), or its dotted path in a code span (`data.label`)."""
    documented = yaml_paths(text) | {span for _, line in _prose_lines(text) for span in _SPAN.findall(line)}
    return [path for path in fields if path not in documented]


# ---- the repository's docs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(doc):
    assert broken_links(doc.read_text(encoding="utf-8"), doc) == []


def test_every_registered_target_is_in_targets_md():
    from qops.targets import list_targets

    text = (REPO / "docs" / "targets.md").read_text(encoding="utf-8")
    missing = [t for t in list_targets() if not re.search(rf"(?<![\w]){re.escape(t)}(?![\w])", text)]
    assert missing == [], f"targets not in docs/targets.md: {missing}"


def test_every_cli_flag_in_cli_md_exists():
    top, subs = parser_flags()
    assert unknown_flags((REPO / "docs" / "cli.md").read_text(encoding="utf-8"), top, subs) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_qops_command_line_in_the_docs_parses(doc):
    """A `qops SUB --flag ...` example anywhere in the docs names a real subcommand and its real flags."""
    top, subs = parser_flags()
    assert unknown_flags(doc.read_text(encoding="utf-8"), top, subs, prose=False) == []


def test_every_subcommand_is_in_cli_md():
    _, subs = parser_flags()
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert [s for s in subs if f"qops {s}" not in text] == []


def test_every_spec_field_is_in_spec_md():
    text = (REPO / "docs" / "spec.md").read_text(encoding="utf-8")
    assert undocumented_fields(text, spec_fields()) == []


# ---- self-tests: each checker catches the error it is for -------------------------------------------------------

def test_slug_follows_github():
    assert github_slug("The stage table") == "the-stage-table"
    assert github_slug("Engines: one per artifact format") == "engines-one-per-artifact-format"
    assert github_slug("`qops run` (no Airflow)") == "qops-run-no-airflow"
    assert github_slug("QAT & FP8, 2-bit") == "qat--fp8-2-bit"
    assert github_slug("Data: `causal_lm` — née ≥ 8") == "data-causal_lm--née--8"
    assert {"faq", "faq-1"} <= anchors("# FAQ\n\n## FAQ\n```\n# not a heading\n```\n")
    assert "not-a-heading" not in anchors("```\n# not a heading\n```\n")


def test_broken_anchor_and_file_are_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    other = tmp_path / "docs" / "other.md"
    other.write_text("# Other\n\n## Real section\n")
    doc = tmp_path / "docs" / "page.md"
    text = ("# Page\n\n## Here\n\nsee [ok](other.md#real-section), [self](#here), [web](https://x.org/#nope)\n"
            "bad: [a](other.md#no-such-section) [b](missing.md) [c](#nowhere)\n"
            "prose ref docs/other.md#gone and (docs/other.md#real-section)\n"
            "```\n[in code](#ignored)\n```\n")
    doc.write_text(text)
    problems = broken_links(text, doc, repo=tmp_path)
    assert len(problems) == 4, problems
    assert any("#no-such-section" in p for p in problems)
    assert any("missing.md" in p for p in problems)
    assert any("#nowhere" in p for p in problems)
    assert any("#gone" in p for p in problems)


def test_missing_target_is_caught():
    text = "| `llm_int4_rtn` / `llm_int4_gptq` |\n"
    found = [t for t in ["llm_int4_rtn", "llm_int4_awq"] if not re.search(rf"(?<![\w]){re.escape(t)}(?![\w])", text)]
    assert found == ["llm_int4_awq"]


def test_unknown_flag_is_caught():
    top, subs = {"--verbose", "--version", "-v"}, {"run": {"--run-id", "--json"}, "quantize": {"--model", "--tune"}}
    good = "| `qops run SPEC [--run-id R]` | uses `--tune` of quantize in prose |\n```\nqops quantize --model m \\\n --tune\n```\n"
    assert unknown_flags(good, top, subs) == []
    bad = ("| `qops run SPEC [--model M]` | x |\nprose `--no-such-flag`\n```\nqops quantize --model m \\\n --run-id r\n```\n"
           "`qops frobnicate --x`\n")
    problems = unknown_flags(bad, top, subs)
    assert any("--model is not a flag of `qops run`" in p for p in problems), problems
    assert any("--no-such-flag" in p for p in problems)
    assert any("--run-id is not a flag of `qops quantize`" in p for p in problems)
    assert any("qops frobnicate" in p for p in problems)
    # outside the CLI page only qops command lines are checked, also behind a venv path and VAR=value
    other = ("pip install --no-deps x; `--anything` in prose\n```bash\nMLFLOW_TRACKING_URI=sqlite:///m.db "
             ".venv/bin/qops run s.yaml --run-id r   # --comment\n.venv/bin/qops run s.yaml --tune\n```\n")
    assert unknown_flags(other, top, subs, prose=False) == ["line 4: --tune is not a flag of `qops run`"]


def test_undocumented_spec_field_is_caught():
    from pydantic import BaseModel

    class Inner(BaseModel):
        depth: int = 0
        width: int = 0

    class Outer(BaseModel):
        name: str
        inner: Inner | None = None
        many: dict[str, Inner] = {}

    fields = spec_fields(Outer)
    assert fields == ["inner", "inner.depth", "inner.width", "many", "many.depth", "many.width", "name"]
    text = "```yaml\nname: x  # width: not a field entry\ninner: {depth: 1}\nmany: {a: {depth: 2}}\n```\n"
    assert undocumented_fields(text, fields) == ["inner.width", "many.width"]
    assert undocumented_fields(text + "`inner.width` is the width\n", fields) == ["many.width"]
    assert undocumented_fields("```yaml\nwidth: 1\n```\n", ["inner.width"]) == ["inner.width"]  # its place


def test_nested_subcommand_flags_count_under_their_command():
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers().add_parser("spec")
    sub.add_argument("--json", action="store_true")
    sub.add_subparsers().add_parser("validate").add_argument("--strict", action="store_true")
    assert _all_flags(dict(_sub_parsers(p))["spec"]) >= {"--json", "--strict"}
