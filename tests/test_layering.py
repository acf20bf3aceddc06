"""Data flows one way: ffnskip <- tuning <- serve; `import ffnskip` needs no Ray."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_tuning_or_serve():
    assert not imported_modules("ffnskip") & {"tuning", "serve"}


def test_tuning_never_imports_serve():
    if (ROOT / "tuning").is_dir():
        assert "serve" not in imported_modules("tuning")


def test_import_ffnskip_works_without_ray_and_the_service_extras():
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'ray', 'optuna', 'sqlalchemy', 'alembic', 'fastapi', 'uvicorn', 'openai'}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ffnskip, ffnskip.cli, ffnskip.decode, ffnskip.engine, ffnskip.loading, ffnskip.saturation, ffnskip.bench\n"
        "print('ok', ffnskip.__version__)\n"
    )
    _runs_ok(blocker)


def test_import_ffnskip_cli_loads_neither_tuning_nor_serve_and_evaluate_is_the_function():
    code = (
        "import sys, inspect\n"
        "import ffnskip, ffnskip.cli\n"
        "assert not {'tuning', 'serve'} & {m.split('.')[0] for m in sys.modules}, 'tuning/serve imported'\n"
        "assert inspect.isfunction(ffnskip.evaluate) and ffnskip.evaluate.__module__ == 'ffnskip.eval.harness'\n"
        "print('ok')\n"
    )
    _runs_ok(code)


def _runs_ok(code: str) -> None:
    """Run ``code`` in a fresh interpreter; it must exit 0 and print ``ok``."""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("ok")
