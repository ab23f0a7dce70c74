"""The house rules that can be read off the source: how chat.py is cut (a section uses only
what is above it), its line length, docstrings, room.js's budget, and the docs' code blocks.
The rules about what the app does (nothing shown before it is committed, rendered once, ...)
are tested where the app does it: chat.py's opening map names each rule's test."""

from __future__ import annotations

import ast
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = (HERE / "chat.py").read_text()
TREE = ast.parse(SOURCE)
SECTION_RE = re.compile(r"^# (\d+)\. (.+)$")


def sections() -> list[tuple[int, int, str]]:
    """(first line, number, title) of each section of chat.py, in order."""
    lines = SOURCE.splitlines()
    return [(n + 1, int(m.group(1)), m.group(2)) for n, line in enumerate(lines)
            if lines[n - 1].startswith("# ----") and (m := SECTION_RE.match(line))]


def section_of(line: int) -> int:
    return max([number for first, number, _ in sections() if first <= line], default=0)


def defined(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return [name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)]


def names_used(node: ast.stmt) -> set[str]:
    """The global names a top-level statement uses when it runs (annotations are only text:
    `from __future__ import annotations`), leaving out each function's own local names."""
    annotations = set()
    for inner in ast.walk(node):
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = [*inner.args.posonlyargs, *inner.args.args, *inner.args.kwonlyargs,
                         inner.args.vararg, inner.args.kwarg]
            for part in [argument.annotation for argument in arguments if argument] + [inner.returns]:
                annotations |= {id(x) for x in ast.walk(part)} if part is not None else set()
        elif isinstance(inner, ast.AnnAssign):
            annotations |= {id(x) for x in ast.walk(inner.annotation)}
    local = set()
    for inner in ast.walk(node):
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and inner is not node:
            local.add(inner.name)  # a function's own helper, defined inside it
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            arguments = inner.args
            local |= {a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                                      arguments.vararg, arguments.kwarg] if a}
            for x in ast.walk(inner):
                if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Store):
                    local.add(x.id)
        elif isinstance(inner, ast.comprehension):
            local |= {x.id for x in ast.walk(inner.target) if isinstance(x, ast.Name)}
    return {x.id for x in ast.walk(node) if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Load)
            and id(x) not in annotations and x.id not in local}


def test_chat_py_is_cut_in_numbered_sections_each_using_only_what_is_above_it():
    """A reader goes top to bottom: a section uses what the sections above it define (and
    its own), never what comes below. The migrations, which run at start, are exempt."""
    found = sections()
    assert [number for _, number, _ in found] == list(range(1, len(found) + 1)) and len(found) >= 15
    where = {name: section_of(node.lineno) for node in TREE.body for name in defined(node)}
    upward = []
    for node in TREE.body:
        if set(defined(node)) & {"MIGRATIONS", "migrate", "__getattr__"}:
            continue
        here = section_of(node.lineno)
        upward += [f"line {node.lineno} ({', '.join(defined(node)) or 'statement'}, section {here}) uses "
                   f"{name} (section {where[name]})" for name in sorted(names_used(node))
                   if where.get(name, 0) > here]
    assert upward == []


def test_chat_py_lines_are_at_most_100_characters():
    assert [n + 1 for n, line in enumerate(SOURCE.splitlines()) if len(line) > 100] == []


def test_every_public_function_has_a_docstring_and_type_hints():
    """Public: a function or method whose name does not start with "_" (what a reader calls)."""
    missing = []
    for node in ast.walk(TREE):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            arguments = [a for a in [*node.args.args, *node.args.kwonlyargs] if a.arg not in ("self", "cls")]
            hinted = node.returns is not None and all(a.annotation is not None for a in arguments)
            if ast.get_docstring(node) is None or not hinted:
                missing.append(f"{node.name} (line {node.lineno})")
    assert missing == []


def test_the_redis_twins_keep_the_local_ones_methods():
    """RedisFanout, RedisRateLimiter and RedisFailureLimit stand in for LocalFanout, RateLimiter
    and FailureLimit: every public method a twin defines is one the local one has, with the
    same parameters, so nothing above section 15 knows which one runs."""
    import inspect

    import chat

    for local, twin in ((chat.LocalFanout, chat.RedisFanout), (chat.RateLimiter, chat.RedisRateLimiter),
                        (chat.FailureLimit, chat.RedisFailureLimit)):
        for name, method in vars(twin).items():
            if callable(method) and not name.startswith("_"):
                assert hasattr(local, name), f"{twin.__name__}.{name} has no twin in {local.__name__}"
                assert (list(inspect.signature(method).parameters)
                        == list(inspect.signature(getattr(local, name)).parameters)), name


def test_only_settings_reads_the_environment():
    """os.environ (or getenv) is read in Settings.from_env and nowhere else in chat.py:
    everything below receives a Settings."""
    readers = []
    for node in ast.walk(TREE):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if (isinstance(inner, ast.Attribute) and inner.attr in ("environ", "getenv")
                        and isinstance(inner.value, ast.Name) and inner.value.id == "os"):
                    readers.append(node.name)
    assert set(readers) == {"from_env"}


def test_the_docs_open_a_code_block_only_where_they_mean_to():
    """A prose line that starts with three backticks opens a code block that swallows what
    follows: the README's opening once hid its own run command that way. Every code block in
    the docs is a fence with one word, its language, after the backticks."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark")
    stray = [(path.name, token.map[0] + 1, token.info)
             for path in [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
             for token in parser.parse(path.read_text()) if token.type == "fence"
             if not re.fullmatch(r"[a-z]+", token.info)]
    assert stray == []
