"""Test helper: the house rule for a refused command, one line ``error: ...`` on stderr."""


def one_error(capsys) -> str:
    """The captured stderr, after checking that it is exactly one line starting ``error: ``."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err
