"""The min-version constraints of .ci/run's second leg are the floors setup.cfg declares."""

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _floors():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].split("\n") + cfg["options.extras_require"]["test"].split("\n")
    floors = {}
    for line in filter(None, (v.strip() for v in lines)):
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", line)
        assert m, f"setup.cfg: {line!r} is not NAME>=VERSION"
        floors[m[1].lower()] = m[2]
    return floors


def _pins():
    pins = {}
    for line in (ROOT / ".ci" / "constraints-min.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def _same(a, b):
    pad = lambda v: [int(p) for p in v.split(".")] + [0] * (3 - len(v.split(".")))  # noqa: E731
    return pad(a) == pad(b)


def test_constraints_pin_every_declared_floor():
    floors, pins = _floors(), _pins()
    floors.pop("ruff")  # lint runs once, in the main leg
    assert set(pins) == set(floors)
    assert all(_same(pins[k], floors[k]) for k in floors), (floors, pins)
