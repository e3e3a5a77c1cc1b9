"""Helpers for CLI tests: run the typer app in-process and check the CLI contract."""

from typer.testing import CliRunner

from transferkit.cli import app

runner = CliRunner()


def ok(args):
    """Run ``transferkit ARGS``; it must exit 0."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + str(res.exception)
    return res


def bad(args, match):
    """Run ``transferkit ARGS``; it must exit 2 with one ``error: …`` line (the last) containing ``match``."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()  # progress lines may come first; the error is the last line
    assert lines and lines[-1].startswith("error: "), res.stderr
    assert sum(ln.startswith("error:") for ln in lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert match in lines[-1], lines[-1]
    return lines[-1]
