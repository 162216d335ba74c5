"""docs/cli.md stays what scripts/gen_cli_docs.py writes from the Click help.

Fast: importing pipeline.cli imports neither TensorFlow nor FAISS models.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_cli_docs.py"
DOC = ROOT / "docs" / "cli.md"
STALE = "docs/cli.md is stale: run python scripts/gen_cli_docs.py"


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_doc_is_current():
    expected = load_generator().render()
    current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    if current != expected:
        pytest.fail(STALE, pytrace=False)


def test_cli_doc_covers_every_command_and_option():
    gen = load_generator()
    text = gen.render()
    for ctx, command in gen._walk(gen.cli_main, "cbir"):
        assert f"\n## {ctx.command_path}\n" in text, ctx.command_path
        for param in command.get_params(ctx):
            if isinstance(param, click.Option) and set(param.opts) != set(ctx.help_option_names):
                assert f"`{', '.join(param.opts)}`" in text, (ctx.command_path, param.opts)
    assert "## cbir bench extract" in text and "--learning-rate" in text


def test_render_ignores_terminal_width(monkeypatch):
    gen = load_generator()
    wide = gen.render()
    monkeypatch.setenv("COLUMNS", "40")
    assert gen.render() == wide


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_check_flag_exit_codes(tmp_path):
    out = tmp_path / "cli.md"
    written = run_script("--out", str(out))
    assert written.returncode == 0, written.stderr
    ok = run_script("--check", "--out", str(out))
    assert (ok.returncode, ok.stderr) == (0, "")
    out.write_text(out.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    stale = run_script("--check", "--out", str(out))
    assert stale.returncode == 1
    assert stale.stderr.splitlines() == [STALE]
    missing = run_script("--check", "--out", str(tmp_path / "none.md"))
    assert missing.returncode == 1


def test_generator_needs_no_tensorflow():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('g', {str(SCRIPT)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.render()\n"
        "print('tensorflow' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
