"""Which code made a stored number: a hash per source file of an experiment's script and the library
modules it imports, transitively. Stored results (a reproduction's seeds, localization records kept for
later sessions) are refused when the code that would recompute them hashes differently.
"""
import ast
import hashlib

from .runs import REPO

# Library modules that change no number of an experiment: the command line, figures, the report, the rules.
NOT_DATA = {"common.cli", "common.config", "common.plots", "common.report", "common.claims", "common.provenance"}


def _module_file(name):
    path = REPO / (name.replace(".", "/") + ".py")
    return path if path.is_file() else None


def code_version(exp):
    """{file: hash} of the code that makes an experiment's numbers: its script and the library modules it
    imports, transitively (NOT_DATA aside); the hash is of the syntax tree without docstrings and without
    the figure functions (top-level `plot_*`: a figure changes no number), so a comment, docstring or
    figure edit keeps the version."""
    version, todo = {}, [exp]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in NOT_DATA or path is None or str(path.relative_to(REPO)) in version:
            continue
        tree = ast.parse(path.read_text())
        tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name.startswith("plot_"))]
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (f"common.{node.module}" if node.module else "common") if node.level else node.module or ""
                todo += [base] + [f"{base}.{a.name}" for a in node.names]
        version[str(path.relative_to(REPO))] = hashlib.sha256(_canonical(tree).encode()).hexdigest()[:12]
    return dict(sorted(version.items()))


def _canonical(node):
    """A syntax tree as text that is the same on every Python version: ast.dump is not (3.12 added fields,
    such as an empty `type_params` on every function), so empty and absent fields are left out."""
    if isinstance(node, ast.AST):
        fields = [f"{k}={_canonical(v)}" for k, v in ast.iter_fields(node) if v is not None and v != []]
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(_canonical(v) for v in node) + "]"
    return repr(node)


def code_difference(saved, now):
    changed = [f for f in sorted(set(saved) | set(now)) if saved.get(f) != now.get(f)]
    return f"code of {', '.join(changed[:3])} changed" if changed else None
