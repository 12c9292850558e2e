"""The package layout: every module imports on its own, no private name crosses a module boundary, no cycles."""

from __future__ import annotations

import ast
import concurrent.futures as cf
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vggt_trt"


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every module of vggt_trt."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def package_imports() -> list[tuple[str, str, str, int]]:
    """(importing module, imported module, imported name, line) for every ``from ... import`` of a vggt_trt
    module, at any depth (function-level imports included)."""
    modules = package_modules()
    found = []
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(name, a.name, "", node.lineno) for a in node.names if a.name.startswith("vggt_trt")]
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "vggt_trt" or target.startswith("vggt_trt."):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.append((name, sub, "", node.lineno) if sub in modules else
                                 (name, target, alias.name, node.lineno))
    return found


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    """Each module in its own interpreter, so an import cycle or a missing import cannot hide behind another."""
    def run(module: str) -> tuple[str, subprocess.CompletedProcess]:
        return module, subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                                      cwd=PACKAGE.parent, timeout=300)

    with cf.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(run, package_modules()))
    failed = {m: p.stderr.strip().splitlines()[-1] for m, p in results if p.returncode != 0}
    assert len(results) > 40
    assert not failed, failed


def test_no_private_name_is_imported_from_another_module() -> None:
    private = [f"{src}:{line} imports {name} from {dst}" for src, dst, name, line in package_imports()
               if name.startswith("_") and not name.startswith("__")]
    assert not private, private


def test_no_import_cycle_between_package_modules() -> None:
    modules = package_modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for src, dst, _, _ in package_imports():
        if dst in modules and dst != src:
            edges[src].add(dst)
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for nxt in sorted(edges[module]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[module] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module)
    assert not cycles, [" -> ".join(c) for c in cycles]


@pytest.mark.parametrize("script,module", [("vggt_to_trt.py", "vggt_trt.cli.convert"),
                                           ("trt_inference.py", "vggt_trt.cli.infer"),
                                           ("pcd_inference.py", "vggt_trt.cli.pcd")])
def test_top_level_scripts_only_call_the_cli(script: str, module: str) -> None:
    tree = ast.parse((PACKAGE.parent / script).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert {getattr(n, "module", None) for n in imports} <= {None, module}
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


def test_argparse_only_in_cli() -> None:
    users = sorted(m for m, (path, _) in package_modules().items()
                   if "argparse" in path.read_text() and not m.startswith("vggt_trt.cli"))
    assert not users, users


def test_underscore_flag_spellings_are_accepted_and_hidden_from_help() -> None:
    from vggt_trt.cli.pcd import build_parser

    parser = build_parser()
    args = parser.parse_args(["--out_dir", "o", "--num_cams=4", "--no_save_batches", "--vggt_engine", "e.engine",
                              "--frame_step", "2", "--colmap_max_points", "7"])
    assert (args.out_dir, args.num_cams, args.save_batches, args.vggt_engine) == (Path("o"), 4, False, Path("e.engine"))
    assert (args.frame_step, args.colmap_max_points) == (2, 7)
    assert parser.parse_args(["--out-dir", "o"]).save_batches is True
    assert parser.parse_args(["--out-dir", "o", "--save-batches"]).save_batches is True
    text = parser.format_help()
    assert "--num-cams" in text and "--no-save-batches" in text
    assert "--num_cams" not in text and "--out_dir" not in text and "_" not in "".join(
        w for w in text.split() if w.startswith("--"))
