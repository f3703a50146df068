"""Every number in a docs table comes from the results file its section links.

A measured table in README.md, CONTRIBUTING.md or docs/*.md sits in a section (heading to heading)
that links its record under bench/results/ or train/results/. Each number of such a table must
appear in the linked files, as written or as the same value (0.9223 = 92.23%, 0.999 = 0.9990,
1,562 = 1562), so a number copied wrong, rounded, or left behind when the record changed fails
here, naming the page, the line and the number. A ratio ("2.66x") may instead be the quotient of
two numbers of the same row or column of the section's tables, which are checked themselves.
"""

import decimal
import glob
import os
import re

import pytest

from tests.helpers import REPO

PAGES = (
    "README.md",
    "CONTRIBUTING.md",
    *sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md")),
)
RESULT_ROOTS = ("bench/results/", "train/results/")
RECORD_SUFFIXES = (".md", ".csv")

# A number not glued to a word or to another number: 0.9914, 92.23%, 2.66x, 1,562, 1.9e-06.
# "A0", "b32", "3x3", "224x224", "fp32" and "7.0M" are not numbers here.
NUMBER = re.compile(
    r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(e[+-]?\d+)?(%|x)?(?![\w]|\.\d)", re.IGNORECASE
)
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
HEADING = re.compile(r"^#{1,6} ")
FENCE = re.compile(r"^\s*```")


def numbers(text):
    """(token as written, its values) for each number in `text`; a percentage also stands for its
    fraction, so 92.23% and 0.9223 meet."""
    found = []
    for match in NUMBER.finditer(text):
        whole, fraction, exponent, suffix = match.groups()
        value = decimal.Decimal(whole.replace(",", "") + (fraction or "") + (exponent or ""))
        values = {value.normalize()}
        if suffix == "%":
            values.add((value / 100).normalize())
        found.append((match.group(0), values))
    return found


def sections(lines):
    """(first line number, lines) per heading-to-heading section, headings in code blocks ignored."""
    start, body, fenced = 1, [], False
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):
            fenced = not fenced
        if not fenced and HEADING.match(line) and body:
            yield start, body
            start, body = number, []
        body.append(line)
    if body:
        yield start, body


def tables(start, body):
    """Each markdown table of a section as rows of (line number, cells), separator rows left out."""
    table, fenced = [], False
    for number, line in enumerate(body, start):
        if FENCE.match(line):
            fenced = not fenced
        if not fenced and line.lstrip().startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                table.append((number, cells))
        elif table:
            yield table
            table = []
    if table:
        yield table


def linked_records(page, body):
    """The result files a section links (a linked folder: every record in it)."""
    records = []
    base = os.path.dirname(os.path.join(REPO, page))
    for target in LINK.findall("\n".join(body)):
        path = os.path.normpath(os.path.join(base, target))
        relative = os.path.relpath(path, REPO).replace(os.sep, "/")
        if not relative.startswith(RESULT_ROOTS):
            continue
        if os.path.isdir(path):
            records += sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.endswith(RECORD_SUFFIXES)
            )
        elif os.path.isfile(path):
            records.append(path)
    return list(dict.fromkeys(records))


def half_step(written):
    """Half the last written digit of a number: how far the rounding may have moved it."""
    return decimal.Decimal(1).scaleb(decimal.Decimal(written).as_tuple().exponent) / 2


def is_quotient(token, rows_and_columns):
    """Whether a ratio token is a/b, rounded as written, for a and b in one row or one column
    (a and b being rounded themselves, their quotient may lie anywhere their rounding allows)."""
    if not token.lower().endswith("x"):
        return False
    written = token[:-1].replace(",", "")
    low = decimal.Decimal(written) - half_step(written)
    high = decimal.Decimal(written) + half_step(written)
    for group in rows_and_columns:
        for a, a_step in group:
            for b, b_step in group:
                if (
                    b - b_step > 0
                    and (a - a_step) / (b + b_step) <= high
                    and ((a + a_step) / (b - b_step) >= low)
                ):
                    return True
    return False


def plain_numbers(cell):
    """(value, half step) of each number in a cell that is not a ratio or a percentage."""
    return [
        (decimal.Decimal(t.replace(",", "")), half_step(t.replace(",", "")))
        for t, _ in numbers(cell_text(cell))
        if t[-1] not in "xX%" and "e" not in t.lower()
    ]


def cell_text(cell):
    return LINK.sub("]", cell)


def unsourced(page, text, read=lambda path: open(path, encoding="utf-8").read()):
    """'page:line: number' for each table number its section's records do not hold."""
    problems = []
    for start, body in sections(text.splitlines()):
        records = linked_records(page, body)
        if not records:
            continue
        known = set()
        for path in records:
            for _, values in numbers(read(path)):
                known |= values
        section_tables = list(tables(start, body))
        groups = []
        for table in section_tables:
            groups += [[n for c in cells for n in plain_numbers(c)] for _, cells in table]
            width = max(len(cells) for _, cells in table)
            groups += [
                [
                    n
                    for _, cells in table
                    if column < len(cells)
                    for n in plain_numbers(cells[column])
                ]
                for column in range(width)
            ]
        names = ", ".join(os.path.relpath(p, REPO) for p in records)
        for table in section_tables:
            for number, cells in table:
                for cell in cells:
                    for token, values in numbers(cell_text(cell)):
                        if values & known or is_quotient(token, groups):
                            continue
                        problems.append(f"{page}:{number}: {token} is not in {names}")
    return problems


@pytest.mark.parametrize("page", PAGES)
def test_every_table_number_is_in_the_results_its_section_links(page):
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        problems = unsourced(page, f.read())
    assert not problems, "\n".join(problems)


def test_the_check_finds_tables_and_catches_a_changed_number():
    """The check is not vacuous: the docs have linked tables, and one altered digit fails."""
    page = "docs/int8.md"
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        text = f.read()
    checked = sum(
        1
        for start, body in sections(text.splitlines())
        if linked_records(page, body)
        for _ in tables(start, body)
    )
    assert checked >= 3
    altered = text.replace("| 0.9914 / 0.9207 |", "| 0.9941 / 0.9207 |", 1)
    assert altered != text
    assert any(": 0.9941 is not in " in p for p in unsourced(page, altered))
