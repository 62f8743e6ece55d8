"""The tables of errors in README.md and docs/errors.md are generated from
tests/test_errors.py's ERROR_CASES.

    python tests/test_error_table.py --write    # rewrite both blocks
    python tests/test_error_table.py            # print docs/errors.md's table

docs/errors.md has a row per case; README one per rule (the first case of those whose
messages differ only in the argument, the values and the shapes they name).  The tests fail when a
block between the markers differs from the table the cases produce, so the documented
messages are the tested ones.
"""

import importlib.util
import os
import re
import sys

from readme_blocks import read_readme_block, write_readme_block

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")
ERRORS_DOC = os.path.join(os.path.dirname(HERE), "docs", "errors.md")
START, END = "<!-- errors:start -->", "<!-- errors:end -->"
HEADER = (
    "<!-- generated from tests/test_errors.py by `python tests/test_error_table.py --write` -->\n"
    "| input | exception | message contains |\n"
    "| --- | --- | --- |\n"
)

# one literal run of a regex: escaped punctuation or characters that are not metacharacters
# (a lone '.' matches itself too, so "bnkernels.forward" reads as written)
_LITERAL = re.compile(r"(?:\\[^A-Za-z0-9]|[^\\^$*+?{}\[\]|()])*")


def load_cases():
    """ERROR_CASES from tests/test_errors.py, imported by path (no conftest, no package)."""
    path = os.path.join(HERE, "test_errors.py")
    spec = importlib.util.spec_from_file_location("_bnkernels_error_cases", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, HERE)  # for helpers it may import from its own folder
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(HERE)
    return module.ERROR_CASES


def literal_pieces(pattern):
    """[[piece, ...], ...]: alternatives of literal pieces joined by '.*', or None if the
    pattern uses any other regex feature (then it is shown as a regex)."""
    alternatives = []
    for alt in pattern.split("|"):
        pieces = alt.split(".*")
        if not all(_LITERAL.fullmatch(p) for p in pieces):
            return None
        alternatives.append([re.sub(r"\\(.)", r"\1", p) for p in pieces])
    return alternatives


def code(text):
    """An inline code span that survives a table cell."""
    text = text.replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return fence + pad + text + pad + fence


def render_match(pattern):
    alternatives = literal_pieces(pattern)
    if alternatives is None:
        return "regex " + code(pattern)
    return " or ".join(" … ".join(code(p) for p in alt if p) for alt in alternatives)


def build_table(cases):
    rows = [
        "| %s | `%s` | %s |" % (c.name.replace("|", "\\|"), c.exc.__name__, render_match(c.match))
        for c in cases
    ]
    return HEADER + "\n".join(rows) + "\n"


def message_key(case):
    """What makes two cases one rule: the exception and the message's first piece with the
    argument it names first, quoted values, shapes and numbers left out (an integer x and
    a complex gamma break one rule)."""
    alternatives = literal_pieces(case.match)
    text = alternatives[0][0] if alternatives else case.match
    text = re.sub(r"\([^()]*(\([^()]*\))?[^()]*\)", "()", text)
    text = re.sub(r"'[^']*'", "''", text)
    text = re.sub(r"\d+", "#", text)
    text = re.sub(r"^\S+\s+(?=(must|is|has|and)\b)", "", text)
    return case.exc, text


def one_per_message(cases):
    """The first case of each message_key, in order."""
    seen, kept = set(), []
    for c in cases:
        if message_key(c) not in seen:
            seen.add(message_key(c))
            kept.append(c)
    return kept


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


def test_readme_error_table_is_current():
    block = read_readme_block(README, START, END)
    expected = "\n" + build_table(one_per_message(load_cases()))
    assert block == expected, (
        "README's error table is out of date: run `python tests/test_error_table.py --write`"
    )


def test_docs_error_table_is_current():
    block = read_readme_block(ERRORS_DOC, START, END)
    expected = "\n" + build_table(load_cases())
    assert block == expected, (
        "docs/errors.md's table is out of date: run `python tests/test_error_table.py --write`"
    )


def test_readme_keeps_every_message():
    cases = load_cases()
    kept = one_per_message(cases)
    assert {message_key(c) for c in kept} == {message_key(c) for c in cases}
    assert len(kept) < len(cases)


def test_table_has_a_row_per_case():
    cases = load_cases()
    table = build_table(cases)
    rows = table.splitlines()[3:]
    assert len(cases) > 0 and len(rows) == len(cases)
    for c, row in zip(cases, rows):
        assert row.startswith("| %s |" % c.name.replace("|", "\\|"))
        assert ("`%s`" % c.exc.__name__) in row


def test_rendered_messages_say_what_the_regex_matches():
    # each shown alternative, its pieces joined by anything, is matched by the case's regex
    for c in load_cases():
        alternatives = literal_pieces(c.match)
        if alternatives is None:
            continue
        for alt in alternatives:
            assert re.search(c.match, " ".join(alt)), (c.name, alt)


if __name__ == "__main__":
    sys.path.append(os.path.dirname(HERE))  # an uninstalled checkout: bnkernels from the tree
    cases = load_cases()
    table = build_table(cases)
    if sys.argv[1:] == ["--write"]:
        write_readme_block(ERRORS_DOC, START, END, "\n" + table)
        short = build_table(one_per_message(cases))
        write_readme_block(README, START, END, "\n" + short)
        for path, t in ((ERRORS_DOC, table), (README, short)):
            print("wrote %d rows to %s" % (len(t.splitlines()) - 3, path))
    elif sys.argv[1:]:
        sys.exit("usage: python tests/test_error_table.py [--write]")
    else:
        sys.stdout.write(table)
