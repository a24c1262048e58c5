"""Test helper: the house rule for a refused command, one line ``error: ...`` on stderr."""


def one_error(capsys) -> str:
    """The captured stderr, after checking that it is exactly one line starting ``error: ``."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def run_refused(module: str, *args: str, timeout: float = 120):
    """Run ``python -m module *args``; check it exits 2 with exactly one ``error:`` line on stderr."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return proc
