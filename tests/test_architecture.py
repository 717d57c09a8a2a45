"""The project's shape, checked: layering of fashion_jax/, what launch/ holds, README's length.

Run as a program to print the counts docs/architecture.md reports:
    python -m tests.test_architecture
"""

import ast
import collections
import pathlib

from fashion_jax import configs
from fashion_jax.train import config_check

REPO = pathlib.Path(__file__).resolve().parents[1]
PROJECT_MODULES = ("fashion_jax", "launch", "configs", "benchmarks", "experiments", "tests")
# Product entry points: everything else (benchmarks, experiments, one-off reports) lives apart.
ENTRY_POINTS = {"__init__.py", "train.py", "evaluate.py", "export.py", "build_data.py",
                "prepare.py", "search.py", "serve.py", "plan.py", "quickstart.sh", "tpu_pod.sh",
                "slurm_gpu.sbatch"}
README_MAX_LINES = 250
# Project files must not send a user to the developers' reference folder they do not have.
# (Spelled in parts so that this file does not match its own scan.)
PRIVATE_REFERENCES = tuple(name + ".md" for name in ("REFERENCE", "FRONTIER", "DESIGN")) + tuple(
    prefix + "/shared" for prefix in ("..", "work"))


def _imported_modules(node: ast.AST, module: str) -> list[str]:
  """Absolute module names an Import/ImportFrom node brings in (relative ones resolved)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if isinstance(node, ast.ImportFrom):
    if node.level:
      base = module.split(".")[:-node.level]
      name = ".".join(base + ([node.module] if node.module else []))
    else:
      name = node.module or ""
    # `from fashion_jax.data import pipeline` imports the submodule fashion_jax.data.pipeline.
    return [f"{name}.{a.name}" for a in node.names] + [name]
  return []


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def function_level_imports(root: str = "fashion_jax") -> list[str]:
  """'path:line: module' of every import of a project module inside a function body."""
  found = []
  for path in sorted((REPO / root).rglob("*.py")):
    module = _module_name(path)
    for fn in ast.walk(ast.parse(path.read_text())):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(fn):
        names = _imported_modules(node, module)
        if any(n.split(".")[0] in PROJECT_MODULES for n in names):
          found.append(f"{path.relative_to(REPO)}:{node.lineno}: {names[-1]}")
  return found


def _package_of(module: str) -> str | None:
  """fashion_jax.data.pipeline -> 'data'; fashion_jax.api -> 'api'; others -> None."""
  parts = module.split(".")
  if parts[0] != "fashion_jax" or len(parts) < 2:
    return None
  return parts[1]


def package_graph(include_function_level: bool = False) -> dict[str, set[str]]:
  """Edges between fashion_jax's packages (and top-level modules) from module-level imports.

  With include_function_level, imports inside functions count too: the cycles they hide.
  """
  known = {p.name if p.is_dir() else p.stem for p in (REPO / "fashion_jax").iterdir()
           if (p.is_dir() and (p / "__init__.py").exists()) or
           (p.suffix == ".py" and p.stem != "__init__")}
  graph = collections.defaultdict(set)
  for path in sorted((REPO / "fashion_jax").rglob("*.py")):
    module = _module_name(path)
    src = _package_of(module)
    if src is None:
      continue
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if include_function_level else tree.body
    for node in nodes:
      for name in _imported_modules(node, module):
        dst = _package_of(name)
        if dst in known and dst != src:
          graph[src].add(dst)
    graph.setdefault(src, set())
  return dict(graph)


def package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every strongly connected group of two or more packages (Tarjan), sorted."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        out.append(sorted(group))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(out)


def non_entry_points() -> list[str]:
  return sorted(p.name for p in (REPO / "launch").iterdir()
                if p.is_file() and p.name not in ENTRY_POINTS)


def readme_lines() -> int:
  return len((REPO / "README.md").read_text().splitlines())


def private_references() -> list[str]:
  hits = []
  for path in sorted(REPO.rglob("*")):
    rel = path.relative_to(REPO)
    if (not path.is_file() or rel.parts[0] in (".git", ".venv", "venv") or
        path.suffix not in (".py", ".md", ".ipynb", ".sh", ".sbatch", ".ini", ".cfg", ".txt")):
      continue
    text = path.read_text(errors="replace")
    hits += [f"{rel}: {ref}" for ref in PRIVATE_REFERENCES if ref in text]
  return hits


def test_no_function_level_imports_of_project_modules_in_the_library():
  assert function_level_imports() == []


def test_no_import_cycle_between_packages():
  graph = package_graph()
  assert {"train", "systems", "data", "models", "evaluate"} <= set(graph)  # The scan saw them.
  assert package_cycles(graph) == []


def test_cycle_detection_finds_a_cycle():
  assert package_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_launch_holds_only_product_entry_points():
  assert non_entry_points() == []


def test_readme_is_a_front_door():
  assert readme_lines() <= README_MAX_LINES


def test_nothing_points_at_the_developers_reference_folder():
  assert private_references() == []


if __name__ == "__main__":
  imports = function_level_imports()
  cycles = package_cycles(package_graph())
  print(f"README.md lines: {readme_lines()} (limit {README_MAX_LINES})")
  print(f"launch/ files that are not product entry points: {len(non_entry_points())} "
        f"{non_entry_points()}")
  print(f"function-level imports of project modules in fashion_jax/: {len(imports)}")
  for line in imports:
    print("  " + line)
  print(f"import cycles between fashion_jax packages: {len(cycles)} {cycles}")
  hidden = package_cycles(package_graph(include_function_level=True))
  print(f"... counting function-level imports too: {len(hidden)} {hidden}")
  print(f"references to the developers' private folder: {private_references()}")


def test_every_config_ends_with_defaults():
  """Each config module returns `config_check.with_defaults(...)`, so every trainer key (e.g.
  grad_accum_steps) exists and can be overridden on the command line."""
  for name in configs.names():
    config = configs.get(name)
    assert config == config_check.with_defaults(config), name
