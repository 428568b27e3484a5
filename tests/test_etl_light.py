"""The ETL stays light: no module of `etl` imports torch (or training), so ETL workers start
fast on a cluster and `patchetl extract --help` does not load torch."""

import subprocess
import sys


def run_in_fresh_python(code: str) -> None:
    """Run `code` in a new interpreter (nothing imported yet); it exits non-zero on failure."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_etl_modules_do_not_import_torch():
    code = (
        "import sys, pkgutil, importlib, etl\n"
        "for m in pkgutil.walk_packages(etl.__path__, 'etl.'): importlib.import_module(m.name)\n"
        "bad = [m for m in ('torch', 'training', 'webdataset') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    run_in_fresh_python(code)


def test_extract_help_does_not_load_torch():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom training.cli import app\n"
        "r = CliRunner().invoke(app, ['extract', '--help'])\n"
        "assert r.exit_code == 0 and '--json' in r.output, r.output\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    run_in_fresh_python(code)


def test_production_code_never_imports_synthetic_data():
    """Synthetic slides are for tests and the demo: every module outside `etl.synth` (ETL,
    WSI core, evaluation, training, inference) imports without loading it."""
    code = (
        "import sys, pkgutil, importlib, etl, training\n"
        "for pkg in (etl, training):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if not m.name.startswith('etl.synth'): importlib.import_module(m.name)\n"
        # walk_packages itself imports the (empty) package etl.synth to list it: its modules count
        "bad = sorted(m for m in sys.modules if m.startswith('etl.synth.'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    run_in_fresh_python(code)
