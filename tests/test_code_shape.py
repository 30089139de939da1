"""The shape of unigrad's own code: no function (method, nested function) longer than MAX_LINES lines, counted from
its `def` line to its last line (decorators left out), as the AST gives them."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "unigrad"
MAX_LINES = 60

# Functions still longer than MAX_LINES, each being split into phases right now in its own module:
# {"path:qualified name": its length when listed}. Empty this list once they are split: the test then holds every
# function to MAX_LINES.
ALLOWED = {
}


def function_lengths(source: str) -> dict[str, int]:
    """{qualified name: lines} of every function and method in `source`, nested ones as outer.inner."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                lengths[name] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return lengths


def too_long(root: Path, limit: int) -> dict[str, int]:
    """{"path:qualified name": lines} of the functions under `root` longer than `limit` lines."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root.parent).as_posix()
        for name, lines in function_lengths(path.read_text()).items():
            if lines > limit:
                found[f"{where}:{name}"] = lines
    return found


def test_no_function_in_unigrad_is_longer_than_the_limit():
    found = too_long(PACKAGE, MAX_LINES)
    new = {name: lines for name, lines in found.items() if name not in ALLOWED}
    assert not new, f"functions over {MAX_LINES} lines (split them into named phases): {new}"


def test_the_scan_counts_def_to_last_line_and_names_methods_and_nested_functions():
    body = "".join(f"    x{i} = {i}\n" for i in range(59))  # def line + 59 + return line = 61 lines
    source = (f"@decorator\ndef long():\n{body}    return 0\n\n\n"
              f"class A:\n    def short(self):\n        def inner():\n            pass\n        return inner\n")
    assert function_lengths(source) == {"long": 61, "A.short": 4, "A.short.inner": 2}


def test_a_planted_61_line_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    (package / "planted.py").write_text(f"def planted():\n{body}    return 0\n\n\ndef fine():\n    return 1\n")
    assert too_long(package, MAX_LINES) == {"pkg/planted.py:planted": 61}
    assert too_long(package, 61) == {}
