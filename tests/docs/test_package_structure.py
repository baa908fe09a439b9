"""The package's shape: a light core, one command-line home, no import circles."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# source folder -> import name (the trainer is the subpackage dali_objcrop/train)
PACKAGES = {"dali_objcrop": "dali_objcrop"}

# A child interpreter in which these top-level modules cannot be imported at all.
_BLOCKED = ("cv2", "nvidia", "torch", "torchvision", "cupy", "PIL", "sklearn", "matplotlib", "tqdm", "scipy")
_BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {_BLOCKED!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked by the test: {{name}}")
            return None
    sys.meta_path.insert(0, Block())
""")


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_core_imports_without_opencv_dali_torch():
    """``import dali_objcrop`` and the NumPy core work where OpenCV, DALI, torch, CuPy and PIL are missing."""
    res = _run_blocked("""
        import sys
        import numpy as np
        import dali_objcrop
        from dali_objcrop import augment, boxstore, dataset, rng, windows, constants, cli
        from dali_objcrop.train import config   # the configuration style: standard library only
        from dali_objcrop import CropConfig, sample_windows, BoxStore, get_recipe, sample_aug_params
        cw = sample_windows(np.array([[640, 480]]), np.array([[0.1, 0.1, 0.5, 0.6]], np.float32),
                            np.array([0, 1]), np.array([0]), seed=0, epoch=0, config=CropConfig())
        assert cw.windows.shape == (1, 2, 4)
        assert "windows" in dir(dali_objcrop) and "ObjCropLoader" in dir(dali_objcrop)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not heavy, heavy
        # a heavy public name fails on first use, naming what is missing
        try:
            dali_objcrop.crop_grid
        except ImportError as e:
            assert "cv2" in str(e), e
        else:
            raise AssertionError("crop_grid imported without OpenCV")
        print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_lazy_public_names_resolve():
    """Every name in ``__all__`` resolves (the lazy ones on first access) to the object its module defines."""
    import importlib

    import dali_objcrop
    for name in dali_objcrop.__all__:
        value = getattr(dali_objcrop, name)
        module = dali_objcrop._LAZY.get(name)
        if module is not None:
            assert value is getattr(importlib.import_module(module, "dali_objcrop"), name)


def test_command_line_lists_every_subcommand_without_heavy_imports():
    """``dali-objcrop --help`` needs none of the heavy dependencies and names each registered subcommand."""
    res = _run_blocked("""
        import contextlib, io
        from dali_objcrop.cli import SUBCOMMANDS, TRAINER_COMMANDS, main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(["--help"])
            except SystemExit:
                pass
        for name in [n for n, _ in SUBCOMMANDS] + [n for n, _, _ in TRAINER_COMMANDS]:
            assert name in out.getvalue(), name
        print("ok")
    """)
    assert res.returncode == 0, res.stderr


def _modules() -> dict[str, Path]:
    out = {}
    for folder, name in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder)
            parts = [name] + list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def test_trainer_is_the_packages_train_subpackage():
    """``dali_objcrop.train`` is this checkout's ``dali_objcrop/train/``: real files, no link, no top-level
    ``train`` folder (a checkout without symlinks -- Windows, core.symlinks=false -- holds the same tree)."""
    import dali_objcrop.train
    import dali_objcrop.train.pretrain
    pkg = REPO / "dali_objcrop" / "train"
    assert Path(dali_objcrop.train.__file__).resolve() == pkg / "__init__.py"
    assert Path(dali_objcrop.train.pretrain.__file__).resolve() == pkg / "pretrain.py"
    assert not pkg.is_symlink() and not (REPO / "train").exists()
    links = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True).stdout
    assert not [ln for ln in links.splitlines() if ln.startswith("120000")], "symbolic links in the repository"
    assert "dali_objcrop.train" in _modules() and "dali_objcrop.train.methods.mocov2" in _modules()


def test_no_sys_path_edits():
    """Scripts, tests and benchmarks import the installed package; none of them edits sys.path."""
    offenders = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0].startswith(".") or rel.parts[0] in ("build", "runs", "out"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            # sys.path.insert(...) / .append / .remove ..., or sys.path = ...
            target = node.value if isinstance(node, ast.Attribute) else None
            if isinstance(node, ast.Assign):
                target = next((t for t in node.targets if isinstance(t, (ast.Attribute, ast.Subscript))), None)
                target = getattr(target, "value", None) if isinstance(target, ast.Subscript) else target
            if (isinstance(target, ast.Attribute) and target.attr == "path" and isinstance(target.value, ast.Name)
                    and target.value.id == "sys"):
                offenders.append(str(rel))
                break
    assert not offenders, offenders


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of this repository that ``name`` imports anywhere in its text (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` imports mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    if name == "dali_objcrop":  # the lazy names of __init__'s __getattr__
        import dali_objcrop
        found.update("dali_objcrop" + m for m in getattr(dali_objcrop, "_LAZY", {}).values())
    return found


def test_no_import_circles():
    """No module of dali_objcrop or train reaches itself through imports (lazy ones included)."""
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_nothing_below_the_command_line_imports_it():
    """Only the CLI package itself and ``__main__`` import ``dali_objcrop.cli``."""
    modules = _modules()
    offenders = [m for m, p in modules.items()
                 if not (m.startswith("dali_objcrop.cli") or m == "dali_objcrop.__main__")
                 and any(i.startswith("dali_objcrop.cli") for i in _imports(m, p, modules))]
    assert not offenders, offenders


def test_built_package_holds_the_trainer(tmp_path):
    """``setup.py build_py`` (what a wheel holds) has dali_objcrop/train as real files, importable from there."""
    lib = tmp_path / "lib"
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    built = lib / "dali_objcrop" / "train"
    for rel in ("__init__.py", "pretrain.py", "config.py", "methods/mocov2.py"):
        assert (built / rel).is_file() and not (built / rel).is_symlink(), rel
        assert (built / rel).read_bytes() == (REPO / "dali_objcrop" / "train" / rel).read_bytes()
    assert not built.is_symlink() and not (lib / "train").exists()   # no top-level "train" package installed
    res = subprocess.run([sys.executable, "-c", "import dali_objcrop.train.config as c; print(c.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(lib)})
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == built / "config.py"


def test_no_references_outside_the_repository():
    """Code and docs cite files of this repository only (not the design notes or contracts kept beside it) and
    no issue numbers: a reader of the repository can follow every reference."""
    import re
    pattern = re.compile(r"DESIGN\.md|PLUGIN_CONTRACT\.md|STYLE\.md|\bissues? #?\d+", re.I)
    offenders = []
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO)
        if (not path.is_file() or rel.parts[0].startswith(".") or rel.parts[0] in ("build", "runs", "out")
                or path.suffix not in (".py", ".md", ".sh", ".h", ".cc", ".cu", ".cpp", ".toml", ".txt")
                or rel.parts[0] == "benchmarks" and "results" in rel.parts or rel.name == "test_package_structure.py"):
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()[:80]}")
    assert not offenders, offenders
