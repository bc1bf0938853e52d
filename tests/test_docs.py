"""The manual matches the code: every config key on docs/configuration.md with its default, the
registries (task kinds, head kinds, families) as the docs list them, no broken relative link
in README.md or docs/*.md, and every test the docs cite."""
from __future__ import annotations

import dataclasses
import pathlib
import re
import typing

import jaxkd.families
import jaxkd.model
import jaxkd.tasks
from jaxkd.config import Config

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG_PAGE = DOCS / "configuration.md"

# A key row of docs/configuration.md: | `section.key` | `default` | meaning |
_KEY_ROW = re.compile(r"^\|\s*`([A-Za-z_][\w.]*)`\s*\|\s*`([^`]*)`\s*\|")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_COMMON_HEADING = "every task kind"  # the heading of the table of task keys every kind reads


# ----------------------------------------------------------------------------- the code's keys


def render_default(value) -> str:
    """A default as the page writes it: YAML's spelling (null, true, [0, 2, 4]), floats short
    (5e-5, 1.0)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m[1] == "-" else "") + m[2], repr(value))
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(render_default(v) for v in value) + "]"
    raise TypeError(f"no rendering for a default of type {type(value).__name__}: {value!r}")


def _optional_section(tp):
    """The dataclass of an `X | None` annotation (a section that may be left out), else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(tp)) == 2 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def section_keys(cls, instance, prefix: str = "") -> dict[str, object]:
    """Every dotted key under a config dataclass and its default, in declaration order.

    A nested section (a dataclass-typed field) contributes its keys; an optional section
    (`AugmentConfig | None`, default null) is a key itself and contributes the keys of its
    default-constructed dataclass too.
    """
    hints = typing.get_type_hints(cls)
    keys: dict[str, object] = {}
    for field in dataclasses.fields(cls):
        key, tp, value = prefix + field.name, hints[field.name], getattr(instance, field.name)
        if dataclasses.is_dataclass(tp):
            keys.update(section_keys(tp, value, key + "."))
        elif (optional := _optional_section(tp)) is not None:
            keys[key] = value
            keys.update(section_keys(optional, value if value is not None else optional(), key + "."))
        else:
            keys[key] = value
    return keys


def task_keys_by_kind() -> dict[str, dict[str, object]]:
    """{task.type: {task key: default}}: the `task.*` keys each task kind reads, from the kind's
    own section class (`jaxkd.tasks.KINDS[type].CONFIG`, a `TaskConfig` subclass)."""
    return {kind: {f"task.{f.name}": f.default for f in dataclasses.fields(module.CONFIG)}
            for kind, module in jaxkd.tasks.KINDS.items()}


def task_tables() -> dict[str, dict[str, object]]:
    """What the page's task tables must hold: "common" (the keys of `TaskConfig`, which every
    kind reads, with its defaults) and one table per kind (its other keys, and a common key
    whose default the kind changes)."""
    from jaxkd.tasks import TaskConfig

    common = {f"task.{f.name}": f.default for f in dataclasses.fields(TaskConfig)}
    tables = {"common": common}
    for kind, keys in task_keys_by_kind().items():
        tables[kind] = {key: value for key, value in keys.items()
                        if key not in common or value != common[key]}
    return tables


def config_keys() -> dict[str, object]:
    """Every config key outside `task`, with its default."""
    return {key: value for key, value in section_keys(Config, Config()).items()
            if not key.startswith("task.")}


# ----------------------------------------------------------------------------- the page's keys


def page_rows(text: str) -> list[tuple[str, str, str]]:
    """(key, default, the ### heading above it) for every key row of the page."""
    rows, heading = [], ""
    for line in text.splitlines():
        if match := _HEADING.match(line):
            heading = match[2] if len(match[1]) >= 3 else ""
        elif match := _KEY_ROW.match(line):
            rows.append((match[1], match[2], heading))
    return rows


def _table_of(heading: str) -> str | None:
    """Which task table a ### heading opens: "common", a task kind, or None (no task table)."""
    if _COMMON_HEADING in heading.lower():
        return "common"
    named = [kind for kind in jaxkd.tasks.KINDS if f"`{kind}`" in heading]
    return named[0] if len(named) == 1 else None


def config_problems(text: str) -> list[str]:
    """What the page gets wrong about the config keys (empty: nothing)."""
    problems = []
    rows = page_rows(text)
    wanted = config_keys()
    seen: dict[str, list[str]] = {}
    task_seen: dict[str, dict[str, str]] = {}
    for key, default, heading in rows:
        if key.startswith("task."):
            table = _table_of(heading)
            if table is None:
                problems.append(f"{key} is listed outside the task tables (under {heading!r})")
                continue
            task_seen.setdefault(table, {})[key] = default
        elif key in wanted:
            seen.setdefault(key, []).append(default)
        else:
            problems.append(f"{key} is on the page but is no config key")
    for key, value in wanted.items():
        expected = render_default(value)
        if key not in seen:
            problems.append(f"{key} (default `{expected}`) is missing from the page")
        elif any(d != expected for d in seen[key]):
            problems.append(f"{key}: the page gives default {seen[key]}, the code `{expected}`")
    for table, keys in task_tables().items():
        listed = task_seen.get(table, {})
        for key, value in keys.items():
            expected = render_default(value)
            if key not in listed:
                problems.append(f"{key} (default `{expected}`) is missing from the {table} task table")
            elif listed[key] != expected:
                problems.append(f"{key} in the {table} task table: the page gives `{listed[key]}`, "
                                f"the code `{expected}`")
        for key in sorted(set(listed) - set(keys)):
            problems.append(f"{key} is in the {table} task table but {table} tasks do not read it")
    for table in sorted(set(task_seen) - set(task_tables())):
        problems.append(f"a task table for {table!r}, which is no task kind")
    return problems


def test_configuration_page_lists_every_key_with_its_default():
    problems = config_problems(CONFIG_PAGE.read_text(encoding="utf-8"))
    assert not problems, "docs/configuration.md disagrees with the config dataclasses:\n  " + \
        "\n  ".join(problems)


def test_configuration_check_sees_a_missing_key_and_a_changed_default():
    text = CONFIG_PAGE.read_text(encoding="utf-8")
    changed = text.replace("| `distill.temperature` | `2.0` |", "| `distill.temperature` | `3.0` |")
    assert changed != text
    assert any("distill.temperature" in p for p in config_problems(changed))
    dropped = "\n".join(line for line in text.splitlines()
                        if not line.startswith("| `data.max_seq_len` |"))
    assert any("data.max_seq_len" in p for p in config_problems(dropped))
    moved = text.replace("| `task.n_best` |", "| `task.tokens_per_answer` |")
    assert any("task.n_best" in p for p in config_problems(moved))


def test_render_default():
    assert [render_default(v) for v in (None, True, False, 0, 0.5, 2.0, 5e-5, 1e-8, (0, 2, 4), "x")] == \
        ["null", "true", "false", "0", "0.5", "2.0", "5e-5", "1e-8", "[0, 2, 4]", "x"]


# ----------------------------------------------------------------------------- registries


def table_column(text: str, header: str) -> list[str]:
    """The backticked names in the first column of the table whose first header cell is
    `header` (in backticks or not); a cell may name several (`roberta`, `xlm-roberta`)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and cells[0].strip("`") == header:
            names = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                names += re.findall(r"`([^`]+)`", row.strip().strip("|").split("|")[0])
            return names
    raise AssertionError(f"no table with the first column {header!r}")


def table_cells(text: str, header: str, column: int) -> dict[str, list[str]]:
    """{first-column name: the backticked names of column `column`} of that table."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and
                 line.strip().strip("|").split("|")[0].strip().strip("`") == header)
    out = {}
    for row in lines[start + 2:]:
        if not row.startswith("|"):
            break
        cells = row.strip().strip("|").split("|")
        (name,) = re.findall(r"`([^`]+)`", cells[0])
        out[name] = re.findall(r"`([^`]+)`", cells[column])
    return out


def test_task_kinds_match_the_registry():
    text = (DOCS / "tasks.md").read_text(encoding="utf-8")
    assert table_column(text, "task.type") == list(jaxkd.tasks.KINDS)
    presets = table_cells(text, "task.type", 2)
    assert presets == {kind: list(module.PRESETS) for kind, module in jaxkd.tasks.KINDS.items()}


def test_transfer_table_matches_the_kinds():
    text = (DOCS / "transfer.md").read_text(encoding="utf-8")
    assert table_column(text, "task.type") == list(jaxkd.tasks.KINDS)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| `task.type` |"))
    header = [c.strip().strip("`") for c in lines[start].strip().strip("|").split("|")]
    for row in lines[start + 2:start + 2 + len(jaxkd.tasks.KINDS)]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        kind = cells[0].strip("`")
        for key, cell in zip(header[1:], cells[1:]):
            takes = jaxkd.tasks.KINDS[kind].TRANSFER[key] is None
            assert cell.startswith("yes" if takes else "no"), (kind, key, cell)


def test_head_kinds_match_the_registry():
    for page in ("tasks.md", "library.md"):
        text = (DOCS / page).read_text(encoding="utf-8")
        assert table_column(text, "head kind") == list(jaxkd.model.HEADS), page


def test_families_match_the_registry():
    text = (DOCS / "families.md").read_text(encoding="utf-8")
    assert table_column(text, "model_type") == list(jaxkd.families.FAMILIES)


def test_public_api_table_matches_the_package():
    import inspect

    import jaxkd
    text = (DOCS / "library.md").read_text(encoding="utf-8")
    table = text[text.index("## The public API"):]
    listed = {name for row in table.splitlines() if row.startswith("|")
              for name in re.findall(r"`([^`]+)`", row.split("|")[2] if row.count("|") > 2 else "")}
    exported = set(jaxkd.__all__)  # each imported from its module on first use
    assert all(not inspect.ismodule(getattr(jaxkd, name)) for name in exported)
    assert listed == exported


# ----------------------------------------------------------------------------- links


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(path: pathlib.Path) -> set[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return {_slug(m[2]) for line in lines if (m := _HEADING.match(line))}


def _pages() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def test_relative_links_point_at_existing_files():
    broken = []
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme_and_the_contents():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    contents = (DOCS / "README.md").read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        if page.name == "README.md":
            continue
        assert f"docs/{page.name}" in readme, page.name
        assert f"]({page.name}" in contents, page.name


def test_tests_named_in_the_docs_exist():
    """A `file.py::test_name` the manual cites as the proof of a behaviour is a test there."""
    missing = []
    for page in _pages():
        for file, name in re.findall(r"([\w/]+\.py)::(test_\w+)", page.read_text(encoding="utf-8")):
            found = [p for p in (ROOT / "tests").rglob(pathlib.Path(file).name)
                     if re.search(rf"^def {name}\(", p.read_text(encoding="utf-8"), re.M)]
            if not found:
                missing.append(f"{page.relative_to(ROOT)}: {file}::{name}")
    assert not missing, "\n".join(missing)
