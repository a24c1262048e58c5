"""Model configs: plain JSON-serializable dicts that fully describe a Bi-Real / FTBNN network.

A config is *resolved* by :func:`resolve`: defaults filled in, the width multiplier applied, the
stem chosen for the input size, and named non-linearity presets expanded to one entry per block, so
the resolved dict alone rebuilds the same network (it is what weight files store).

:data:`SCHEMA` is the table of every field (JSON type, range, default, meaning); ``docs/format.md``
section 3 prints it and states how the network is built from it. :func:`validate` checks a resolved
config field by field (types first, so a hostile value is never walked deeply), then across fields,
then the size caps (:data:`MAX_PARAMETERS`, :data:`MAX_ACTIVATION`) computed from the config alone
before anything is allocated. :func:`tensor_layout` lists the exact state-dict entries (names,
shapes, dtypes, binary packing) a config's network has, without building it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from refbnn.bits import PAD_VALUES, SIGN_AT_ZERO_TRAINING
from refbnn.nn.binary import SCALES
from refbnn.nn.functional import ACT_GRADS

NONLINEARITIES = ("none", "relu", "prelu", "fprelu")
POSITIONS = ("after_add", "before_add")
DOWNSAMPLES = ("real", "binary", "cheap")

#: Named non-linearity placements (see docs/models.md, "The ReLU trap").
NONLINEARITY_PRESETS = (
    "none",             # Bi-Real Net: no explicit non-linearity
    "fprelu",           # FPReLU after every block
    "relu_stage_end",   # FPReLU after every block, but ReLU on the residual branch of each stage's last block
    "relu_last",        # FPReLU after every block, ReLU after the network's last block (feeds only the head)
    "relu_branch",      # ReLU on the residual branch of every block
)

# --- caps: generous for real networks (the largest preset, ftbnn34_g2 at 224x224, uses a sixth of
# the parameter cap and a twelfth of the activation cap), small enough
# that a hostile config is refused before it allocates gigabytes or runs for minutes ------------
MAX_CHANNELS = 8192        # any channel count: input, stem, bridge, stage widths, groups
MAX_SIDE = 8192            # input height / width
MAX_CLASSES = 1_000_000
MAX_STAGES = 8
MAX_BLOCKS = 512           # blocks of all stages together
MAX_KERNEL = 15            # stem kernel (odd)
MAX_STRIDE = 8             # stem stride
MAX_NAME = 256             # characters of "name"
MAX_MULTIPLIER = 64.0
MAX_PARAMETERS = 2 ** 28   # 268,435,456 stored values (1 GiB as float32); ftbnn34_g2: 47.4 M
MAX_ACTIVATION = 2 ** 26   # 67,108,864 values per image for one layer's output or im2col matrix
#: the default BatchNorm epsilon of every BatchNorm layer (PyTorch's)
BN_EPS = 1e-5

DEFAULTS = {
    "name": "custom",
    "input_shape": [3, 224, 224],
    "num_classes": 1000,
    "stem_channels": 64,
    "stem_kernel": None,      # None: chosen from the input size
    "stem_stride": None,
    "stem_pool": None,
    "bridge_channels": None,
    "widths": [64, 128, 256, 512],
    "blocks": [4, 4, 4, 4],
    "groups": 1,
    "reduction_groups": 1,
    "downsample": "real",
    "scale": "none",
    "nonlinearity": "none",
    "nonlinearity_position": "after_add",
    "sign_at_zero": 1,
    "act_grad": "approx_sign",
    "pad_value": 0,
    "width_multiplier": 1.0,
    "large_stem_kernel": 7,   # stem kernel on ImageNet-size input (3 for the derived models)
    "bn_eps": BN_EPS,
    "conv_padding": "symmetric",
    "pad_values": {},
}
CONV_PADDINGS = ("symmetric", "tf")


class ConfigError(ValueError):
    """A model config that cannot describe a valid network; the message names the field."""


# --- the schema -----------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool | np.bool_)


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool | np.bool_) and math.isfinite(v)


def _int_in(lo, hi, odd=False):
    def check(v, resolved):
        if not _is_int(v):
            return f"must be an integer, got {_show(v)}"
        if not lo <= v <= hi:
            return f"must be in {lo}..{hi}, got {v}"
        if odd and v % 2 == 0:
            return f"must be odd, got {v}"
        return None
    return check


def _nullable(check, resolved_too=False):
    def nullable(v, resolved):
        if v is None and (resolved_too or not resolved):
            return None
        return check(v, resolved)
    return nullable


def _one_of(choices):
    def check(v, resolved):
        if not isinstance(v, str) or v not in choices:
            return f"must be one of {', '.join(repr(c) for c in choices)}, got {_show(v)}"
        return None
    return check


def _int_choice(choices):
    def check(v, resolved):
        if not _is_int(v) or v not in choices:
            return f"must be one of the integers {', '.join(map(str, choices))}, got {_show(v)}"
        return None
    return check


def _list_of(item, lo_len, hi_len):
    def check(v, resolved):
        if not isinstance(v, list | tuple):
            return f"must be a list, got {_show(v)}"
        if not lo_len <= len(v) <= hi_len:
            return f"must have {lo_len}..{hi_len} entries, got {len(v)}"
        for i, x in enumerate(v):
            problem = item(x, resolved)
            if problem:
                return f"entry {i} {problem}"
        return None
    return check


def _name(v, resolved):
    if not isinstance(v, str) or not 1 <= len(v) <= MAX_NAME:
        return f"must be a string of 1..{MAX_NAME} characters, got {_show(v)}"
    return None if encodes_utf8(v) else "must be valid Unicode text (no lone surrogates)"


def _input_shape(v, resolved):
    if not isinstance(v, list | tuple) or len(v) != 3:
        return f"must be a list [C, H, W] of 3 integers, got {_show(v)}"
    for axis, x, hi in zip("CHW", v, (MAX_CHANNELS, MAX_SIDE, MAX_SIDE)):
        problem = _int_in(1, hi)(x, resolved)
        if problem:
            return f"{axis} {problem}"
    return None


def _stem_pool(v, resolved):
    if not isinstance(v, bool):
        return f"must be true or false, got {_show(v)}"
    return None


def _per_block(what, choices, presets=()):
    item = _one_of(choices)

    def check(v, resolved):
        if isinstance(v, str) and not resolved:
            known = (f"a preset ({', '.join(presets)}) or " if presets else "") + \
                f"one of {', '.join(choices)} per block"
            return None if v in choices or v in presets else f"unknown {what} {v!r}; {known}"
        return _list_of(item, 1, MAX_BLOCKS)(v, resolved)
    return check


def _multiplier(v, resolved):
    if not _is_number(v) or not 0 < v <= MAX_MULTIPLIER:
        return f"must be a number in (0, {MAX_MULTIPLIER:g}], got {_show(v)}"
    if resolved and v != 1:
        return f"must be 1.0 in a resolved config (already applied), got {v}"
    return None


def _pad_values(v, resolved):
    if not isinstance(v, dict):
        return f"must be an object {{binary conv name: 0 | 1 | -1}}, got {_show(v)}"
    if len(v) > 2 * MAX_BLOCKS + 1:
        return f"has {len(v)} entries, more than a network's binary convs can have"
    for name, x in v.items():
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or not encodes_utf8(name):
            return f"has a key that is not a layer name: {_show(name)}"
        if not _is_int(x) or x not in PAD_VALUES:
            return f"[{name!r}] must be one of the integers 0, 1, -1, got {_show(x)}"
    return None


def _bn_eps(v, resolved):
    if not _is_number(v) or not 0 < v <= 1:
        return f"must be a number in (0, 1], got {_show(v)}"
    return None


@dataclass(frozen=True)
class Field:
    """One config field: ``type`` and ``range`` as ``docs/format.md`` prints them; ``check(value,
    resolved)`` returns the problem or ``None``; ``required``: a resolved config written by a
    refbnn file must hold it (fields added later are optional and default to the old behaviour)."""

    name: str
    type: str
    range: str
    check: object
    meaning: str
    required: bool = True


_CH = f"1..{MAX_CHANNELS}"

#: Every config field, in the order of ``DEFAULTS`` (docs/format.md section 3 is this table).
SCHEMA = (
    Field("name", "string", f"1..{MAX_NAME} characters", _name,
          "preset name or free text; no effect on the network"),
    Field("input_shape", "[int, int, int]", f"C {_CH}, H and W 1..{MAX_SIDE}", _input_shape,
          "[C, H, W] of one input image (NCHW without N)"),
    Field("num_classes", "int", f"1..{MAX_CLASSES:,}", _int_in(1, MAX_CLASSES),
          "outputs of the classifier `fc`"),
    Field("stem_channels", "int", _CH, _int_in(1, MAX_CHANNELS),
          "output channels S of the real stem convolution `conv1`"),
    Field("stem_kernel", "int", f"odd, 1..{MAX_KERNEL}",
          _nullable(_int_in(1, MAX_KERNEL, odd=True)),
          "kernel k of `conv1` (k x k, stride `stem_stride`, zero padding k // 2 on every side)"),
    Field("stem_stride", "int", f"1..{MAX_STRIDE}", _nullable(_int_in(1, MAX_STRIDE)),
          "stride of `conv1`"),
    Field("stem_pool", "bool", "true / false", _nullable(_stem_pool),
          "true: a 3x3 max-pool, stride 2, padding 1 (padded taps never win) after `bn1`"),
    Field("bridge_channels", "int or null", _CH, _nullable(_int_in(1, MAX_CHANNELS), True),
          "derived models: the binary 3x3 bridge block from S to this width; null: no bridge"),
    Field("widths", "[int, ...]", f"1..{MAX_STAGES} entries, each {_CH}",
          _list_of(_int_in(1, MAX_CHANNELS), 1, MAX_STAGES), "output channels of each stage"),
    Field("blocks", "[int, ...]", f"one per stage, each >= 1, {MAX_BLOCKS} in all",
          _list_of(_int_in(1, MAX_BLOCKS), 1, MAX_STAGES), "basic blocks of each stage"),
    Field("groups", "int", f"{_CH}, divides every width", _int_in(1, MAX_CHANNELS),
          "groups of the binary 3x3 convolution of every stride-1 block"),
    Field("reduction_groups", "int", f"{_CH}, divides both widths", _int_in(1, MAX_CHANNELS),
          "groups of the binary 3x3 convolution of every stride-2 block"),
    Field("downsample", "string", ", ".join(DOWNSAMPLES), _one_of(DOWNSAMPLES),
          "shortcut of a block whose stride or width changes (section 3.2)"),
    Field("scale", "string", ", ".join(SCALES), _one_of(SCALES),
          "binary convolution output factor: none, or mean_abs: alpha[o] = mean(abs(W[o]))"),
    Field("nonlinearity", "[string, ...]", "one per block: " + ", ".join(NONLINEARITIES),
          _per_block("nonlinearity", NONLINEARITIES, NONLINEARITY_PRESETS),
          "the explicit non-linearity of each block, in block order (section 3.3)"),
    Field("nonlinearity_position", "[string, ...]", "one per block: " + ", ".join(POSITIONS),
          _per_block("position", POSITIONS), "where each block's non-linearity sits (section 3.2)"),
    Field("sign_at_zero", "int", "1, -1 or 0", _int_choice(SIGN_AT_ZERO_TRAINING),
          "sign(0) of every binary convolution's input and weight (docs/semantics.md section 1)"),
    Field("act_grad", "string", ", ".join(ACT_GRADS), _one_of(ACT_GRADS),
          "training only: the input binarizer's backward (docs/semantics.md section 8)"),
    Field("pad_value", "int", "0, 1 or -1", _int_choice(PAD_VALUES),
          "value of the padded taps of every binary 3x3 convolution, after the sign (section 3.2)"),
    Field("width_multiplier", "number", f"resolved: 1.0 (given: (0, {MAX_MULTIPLIER:g}])",
          _multiplier, "applied by resolution to every width; 1.0 once applied"),
    Field("large_stem_kernel", "int", f"odd, 1..{MAX_KERNEL}", _int_in(1, MAX_KERNEL, odd=True),
          "resolution only: stem_kernel chosen for inputs of 64 pixels or more"),
    Field("bn_eps", "number", "(0, 1]", _bn_eps,
          "epsilon of every BatchNorm layer: y = (x - mean) / sqrt(var + bn_eps) * weight + bias",
          required=False),
    Field("conv_padding", "string", ", ".join(CONV_PADDINGS), _one_of(CONV_PADDINGS),
          "symmetric: PyTorch padding (k // 2 on every side of the stem conv and the 3x3 binary convs, "
          "1 around the stem max-pool); tf: TensorFlow/Keras 'same' (output ceil(in / stride), the odd "
          "padding row/column at the bottom/right, as Larq models)", required=False),
    Field("pad_values", "object", "{binary conv name: 0, 1 or -1}", _pad_values,
          "per-layer pad values overriding pad_value (names as binary_conv_names lists them: "
          "bridge.binary_conv, layerS.B.binary_conv, layerS.B.downsample.1)", required=False),
)
FIELDS = {f.name: f for f in SCHEMA}
assert list(FIELDS) == list(DEFAULTS)


def _show(v) -> str:
    """A short, safe description of a (possibly huge or deeply nested) value for a message."""
    if isinstance(v, list | tuple | dict):
        return f"a {'list' if not isinstance(v, dict) else 'object'} of {len(v)} entries"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def encodes_utf8(s: str) -> bool:
    """Whether ``s`` is valid Unicode text, i.e. encodes to UTF-8 (no lone surrogates)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _label(cfg) -> str:
    name = cfg.get("name") if isinstance(cfg, Mapping) else None
    return name if isinstance(name, str) and _name(name, True) is None else "config"


def _check_fields(cfg: Mapping, resolved: bool) -> None:
    """Shallow type and range check of every present field (never recurses into a value)."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"model config must be a JSON object, got {_show(cfg)}")
    bad_keys = [k for k in cfg if not isinstance(k, str) or k not in FIELDS]
    if bad_keys:
        shown = ", ".join(sorted(repr(k) if not isinstance(k, str) else k for k in bad_keys)[:5])
        raise ConfigError(f"{_label(cfg)}: unknown config fields: {shown}")
    for key, value in cfg.items():
        problem = FIELDS[key].check(value, resolved)
        if problem:
            raise ConfigError(f"{_label(cfg)}: config field {key!r} {problem}")


def _normalized(v):
    """Python ints for any integer type, lists for tuples (values were checked to be flat)."""
    if isinstance(v, list | tuple):
        return [_normalized(x) for x in v]
    if isinstance(v, dict):
        return {k: _normalized(x) for k, x in v.items()}
    if _is_int(v):
        return int(v)
    if isinstance(v, Real) and not isinstance(v, bool):
        return float(v)
    return v


# --- resolution -----------------------------------------------------------------------------------

def expand_nonlinearity(preset: str, blocks: list[int]) -> tuple[list[str], list[str]]:
    """Per-block ``(nonlinearity, position)`` lists for a named preset."""
    n = sum(blocks)
    last_of_stage = set()
    total = 0
    for b in blocks:
        total += b
        last_of_stage.add(total - 1)
    if preset == "none":
        return ["none"] * n, ["after_add"] * n
    if preset == "fprelu":
        return ["fprelu"] * n, ["after_add"] * n
    if preset == "relu_stage_end":
        kinds = ["relu" if i in last_of_stage else "fprelu" for i in range(n)]
        return kinds, ["before_add" if i in last_of_stage else "after_add" for i in range(n)]
    if preset == "relu_last":
        return ["fprelu"] * (n - 1) + ["relu"], ["after_add"] * n
    if preset == "relu_branch":
        return ["relu"] * n, ["before_add"] * n
    raise ConfigError(f"unknown non-linearity preset {preset!r}; known: {', '.join(NONLINEARITY_PRESETS)}")


def scale_widths(cfg: dict, m: float) -> None:
    """Apply width multiplier ``m`` in place, keeping the network valid: stage 1 is rounded to a
    multiple of ``lcm(groups, reduction_groups)``; later stages keep their integer ratio to stage 1
    (so doubling widths still double); the stem and bridge are rounded, and a stem that equalled
    stage 1 still does."""
    unit = math.lcm(int(cfg["groups"]), int(cfg["reduction_groups"]))
    widths = [int(w) for w in cfg["widths"]]
    first = max(unit, round(widths[0] * m / unit) * unit)
    if all(w % widths[0] == 0 for w in widths):
        scaled = [first * (w // widths[0]) for w in widths]
    else:
        scaled = [max(unit, round(w * m / unit) * unit) for w in widths]
    stem = int(cfg["stem_channels"])
    cfg["stem_channels"] = first if stem == widths[0] else max(1, round(stem * m))
    if cfg["bridge_channels"] is not None:
        bridge = int(cfg["bridge_channels"])
        cfg["bridge_channels"] = first if bridge == widths[0] else max(unit, round(bridge * m / unit) * unit)
    cfg["widths"] = scaled


def resolve(config: Mapping) -> dict:
    """Return the resolved, validated copy of ``config`` (see module docstring). Idempotent.

    A named non-linearity preset brings its own per-block positions unless ``config`` names
    ``nonlinearity_position`` itself (any value, ``"after_add"`` included: it then applies to every
    block). A resolved config holds both as per-block lists, so resolving it again keeps them.

    Every present field is type- and range-checked before anything else touches it, so a bad value
    (a string width, a 700-level nested list, 10**9 classes) is a :class:`ConfigError` naming the
    field, never a ``TypeError``, ``RecursionError`` or ``MemoryError``."""
    _check_fields(config, resolved=False)
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update({k: _normalized(v) for k, v in config.items()})
    _, h, w = cfg["input_shape"]
    small = min(h, w) < 64
    if cfg["stem_kernel"] is None:
        cfg["stem_kernel"] = 3 if small else cfg["large_stem_kernel"]
    if cfg["stem_stride"] is None:
        cfg["stem_stride"] = 1 if small else 2
    if cfg["stem_pool"] is None:
        cfg["stem_pool"] = not small
    if len(cfg["blocks"]) != len(cfg["widths"]):
        raise ConfigError(f"{_label(cfg)}: widths and blocks need one entry per stage "
                          f"({len(cfg['widths'])} widths, {len(cfg['blocks'])} blocks)")
    if sum(cfg["blocks"]) > MAX_BLOCKS:
        raise ConfigError(f"{_label(cfg)}: blocks: {sum(cfg['blocks'])} blocks in all, more than the "
                          f"cap of {MAX_BLOCKS}")
    m = float(cfg["width_multiplier"])
    if m != 1.0:
        scale_widths(cfg, m)
        cfg["width_multiplier"] = 1.0  # applied: resolving again changes nothing
    n = sum(cfg["blocks"])
    nl, pos = cfg["nonlinearity"], cfg["nonlinearity_position"]
    if isinstance(nl, str):
        if nl in NONLINEARITY_PRESETS:
            nl, preset_pos = expand_nonlinearity(nl, cfg["blocks"])
            if "nonlinearity_position" not in config:  # a position given explicitly wins
                pos = preset_pos
        elif nl in NONLINEARITIES:
            nl = [nl] * n
        else:
            raise ConfigError(f"unknown nonlinearity {nl!r}; a preset ({', '.join(NONLINEARITY_PRESETS)}) "
                              f"or one of {NONLINEARITIES} per block")
    if isinstance(pos, str):
        pos = [pos] * n
    cfg["nonlinearity"], cfg["nonlinearity_position"] = list(nl), list(pos)
    validate(cfg)
    return cfg


def validate(cfg: Mapping) -> None:
    """Raise :class:`ConfigError` naming the first field of a resolved config that cannot describe
    a valid network: unknown or missing fields, types and ranges (:data:`SCHEMA`), the relations
    between fields, then the size caps (:func:`size_of`)."""
    _check_fields(cfg, resolved=True)
    missing = [f.name for f in SCHEMA if f.name not in cfg and f.required]
    if missing:
        raise ConfigError(f"{_label(cfg)}: missing config field {missing[0]!r}")

    def need(cond, msg):
        if not cond:
            raise ConfigError(f"{_label(cfg)}: {msg}")

    widths, blocks = cfg["widths"], cfg["blocks"]
    need(len(widths) == len(blocks), "widths and blocks need one entry per stage")
    n = sum(blocks)
    need(n <= MAX_BLOCKS, f"blocks: {n} blocks in all, more than the cap of {MAX_BLOCKS}")
    need(len(cfg["nonlinearity"]) == n, f"nonlinearity needs {n} entries, one per block")
    need(len(cfg["nonlinearity_position"]) == n, f"nonlinearity_position needs {n} entries")
    prev = cfg["bridge_channels"] or cfg["stem_channels"]
    for s, width in enumerate(widths):
        g = cfg["groups"]
        need(width % g == 0, f"groups: stage {s + 1} width {width} is not divisible by groups={g}")
        if s > 0:
            rg = cfg["reduction_groups"]
            need(prev % rg == 0 and width % rg == 0,
                 f"reduction_groups: stage {s + 1}: reduction_groups={rg} must divide {prev} and {width}")
        elif cfg["bridge_channels"] is None:
            need(width == cfg["stem_channels"],
                 f"widths: stage 1 width {width} must equal stem_channels {cfg['stem_channels']} "
                 "without a bridge")
        else:  # a stride-1 block cannot change width: its 2x2 shortcut pool would halve the map
            need(width == prev, f"bridge_channels: the bridge ({prev}) must output the stage-1 "
                 f"width {width}")
        if cfg["downsample"] == "cheap" and s > 0:
            need(width % prev == 0, f"downsample: cheap downsampling needs stage {s + 1} width "
                 f"{width} to be a multiple of {prev}")
        prev = width
    names = set(binary_conv_names(cfg))
    for name in cfg["pad_values"]:
        need(name in names, f"pad_values names {name!r}, not a binary conv of this network")
    params, activation, where = size_of(cfg)
    need(params <= MAX_PARAMETERS, f"widths/blocks/num_classes: the network has {params:,} stored "
         f"values, more than the cap of {MAX_PARAMETERS:,}")
    need(activation <= MAX_ACTIVATION, f"input_shape/widths: {where} holds {activation:,} values "
         f"per image, more than the cap of {MAX_ACTIVATION:,}")


def binary_conv_names(cfg: Mapping) -> list[str]:
    """Module paths of every binary conv of a resolved config's network, in call order."""
    names = ["bridge.binary_conv"] if cfg["bridge_channels"] is not None else []
    for si, blocks in enumerate(stage_specs(cfg)):
        for bi, b in enumerate(blocks):
            if b.downsample and cfg["downsample"] == "binary":
                names.append(f"layer{si + 1}.{bi}.downsample.1")
            names.append(f"layer{si + 1}.{bi}.binary_conv")
    return names


def to_json(cfg: dict) -> str:
    """Canonical JSON text of a (resolved) config: sorted keys, no whitespace variation."""
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


#: nesting depth of JSON arrays/objects accepted by :func:`loads_json` (refbnn writes at most 6)
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` in JSON ``text``, counted without recursion (brackets inside
    strings do not count; an unterminated string can only over-count)."""
    stripped = _JSON_STRING.sub("", text).encode("utf-8", "surrogatepass")
    a = np.frombuffer(stripped, dtype=np.uint8)
    step = ((a == 0x5B) | (a == 0x7B)).astype(np.int64) - ((a == 0x5D) | (a == 0x7D))
    return int(np.cumsum(step).max(initial=0))


def loads_json(text: str, what: str = "JSON", max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` of RFC 8259 JSON without recursion risk: the nesting depth is checked first;
    ``NaN``/``Infinity``, numbers beyond the float64 range (``1e400``), duplicate object keys and
    lone surrogate escapes (``"\\udc80"``) are refused. Raises ``ValueError`` naming ``what``."""
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"{what} nests {depth} levels deep, more than {max_depth}")

    def no_constant(c):
        raise ValueError(f"{c} is not JSON")

    def finite(text):
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text[:20]} is out of the float64 range")
        return value

    def unique(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out
    try:
        value = json.loads(text, parse_constant=no_constant, parse_float=finite,
                           object_pairs_hook=unique)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{what} is not valid JSON ({e})") from None
    bad = _first_bad_string(value)
    if bad is not None:
        raise ValueError(f"{what} holds a string that is not valid Unicode: {bad!r}")
    return value


def _first_bad_string(value):
    """A string (key or value) of a parsed JSON value that UTF-8 cannot encode, else None."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if not encodes_utf8(v):
                return v
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
    return None


def from_json(text: str) -> dict:
    """The resolved config of JSON ``text`` (bounded nesting, see :func:`loads_json`)."""
    try:
        cfg = loads_json(text, "model config")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(cfg, dict):
        raise ConfigError("model config JSON must be an object")
    return resolve(cfg)


# --- layout: the network a resolved config describes, without building it ------------------------

@dataclass(frozen=True)
class BlockSpec:
    """One basic block as a resolved config lays it out (the single source for every builder)."""

    cin: int
    cout: int
    stride: int
    groups: int
    downsample: bool        # needs a shortcut other than the identity
    nonlinearity: str
    position: str
    name: str = ""          # module path, "layer<S>.<B>"


def binary_options(cfg: dict, name: str | None = None) -> dict:
    """Keyword arguments (``scale``, ``sign_at_zero``, ``act_grad``, ``pad_value``) of the binary
    conv at module path ``name``, whose ``pad_values`` entry overrides ``pad_value``; without
    ``name`` those every binary conv shares."""
    opts = {k: cfg[k] for k in ("scale", "sign_at_zero", "act_grad", "pad_value")}
    if name is not None:
        opts["pad_value"] = cfg["pad_values"].get(name, opts["pad_value"])
    return opts


def bridge_spec(cfg: dict):
    """``(cin, cout, nonlinearity)`` of the derived models' bridge, or ``None``. Its non-linearity is
    FPReLU whenever the blocks use any non-linearity."""
    if cfg["bridge_channels"] is None:
        return None
    kind = "fprelu" if any(k != "none" for k in cfg["nonlinearity"]) else "none"
    return cfg["stem_channels"], cfg["bridge_channels"], kind


def stage_specs(cfg: dict) -> list[list[BlockSpec]]:
    """The blocks of every stage: the first block of stages 2.. has stride 2 and
    ``reduction_groups``; a block whose stride or width changes gets a downsampling shortcut."""
    prev = cfg["bridge_channels"] or cfg["stem_channels"]
    index = 0
    stages = []
    for si, (width, nblocks) in enumerate(zip(cfg["widths"], cfg["blocks"])):
        blocks = []
        for bi in range(nblocks):
            stride = 2 if (si > 0 and bi == 0) else 1
            groups = cfg["reduction_groups"] if stride == 2 else cfg["groups"]
            blocks.append(BlockSpec(prev, width, stride, groups, stride != 1 or prev != width,
                                    cfg["nonlinearity"][index], cfg["nonlinearity_position"][index],
                                    f"layer{si + 1}.{bi}"))
            prev = width
            index += 1
        stages.append(blocks)
    return stages


@dataclass(frozen=True)
class TensorSpec:
    """One state-dict entry: ``name``, ``shape``, ``dtype`` (``"float32"`` or ``"int64"``), and for
    a binary layer's latent weight ``(O, I, KH, KW)`` its ``groups`` (else ``None``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    groups: int | None = None

    @property
    def binary(self) -> bool:
        return self.groups is not None


def _layers(cfg: dict):
    """``(module path, kind, channels out, channels in per group, kernel, groups, activation)`` of
    every module with tensors, in the network's state-dict order; ``activation`` is the largest
    per-image value count the module produces or unfolds (its output, or its im2col matrix)."""
    c, h, w = cfg["input_shape"]
    k, s, stem = cfg["stem_kernel"], cfg["stem_stride"], cfg["stem_channels"]
    h, w = (h - 1) // s + 1, (w - 1) // s + 1
    yield "conv1", "conv", stem, c, k, 1, max(c * k * k, stem) * h * w
    yield "bn1", "bn", stem, 0, 0, 1, stem * h * w
    if cfg["stem_pool"]:
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    bridge = bridge_spec(cfg)
    if bridge is not None:
        cin, cout, kind = bridge
        yield "bridge.binary_conv", "bconv", cout, cin, 3, 1, max(cin * 9, cout) * h * w
        yield "bridge.bn1", "bn", cout, 0, 0, 1, cout * h * w
        yield "bridge.nonlinear", kind, cout, 0, 0, 1, cout * h * w
    for si, specs in enumerate(stage_specs(cfg)):
        for bi, b in enumerate(specs):
            p = f"layer{si + 1}.{bi}"
            hin, win = h, w
            h, w = (h - 1) // b.stride + 1, (w - 1) // b.stride + 1
            yield f"{p}.binary_conv", "bconv", b.cout, b.cin // b.groups, 3, b.groups, \
                max(b.cin * 9 * h * w, b.cout * h * w)
            yield f"{p}.bn1", "bn", b.cout, 0, 0, 1, b.cout * h * w
            if b.downsample and cfg["downsample"] != "cheap":
                kind = "conv" if cfg["downsample"] == "real" else "bconv"
                yield f"{p}.downsample.1", kind, b.cout, b.cin, 1, 1, max(b.cin * hin * win,
                                                                          b.cout * h * w)
                yield f"{p}.downsample.2", "bn", b.cout, 0, 0, 1, b.cout * h * w
            elif b.downsample:
                yield f"{p}.downsample.1", "repeat", b.cout, b.cin, 0, 1, b.cout * h * w
            yield f"{p}.nonlinear", b.nonlinearity, b.cout, 0, 0, 1, b.cout * h * w
    yield "fc", "linear", cfg["num_classes"], cfg["widths"][-1], 0, 1, cfg["num_classes"]


def tensor_layout(cfg: dict) -> list[TensorSpec]:
    """Every state-dict entry of the network a resolved ``cfg`` describes, in state-dict order (what
    ``BNNResNet(cfg).state_dict()`` holds, tested for every preset), computed without allocating."""
    out = []
    for path, kind, o, i, k, g, _ in _layers(cfg):
        if kind in ("conv", "bconv"):
            out.append(TensorSpec(f"{path}.weight", (o, i, k, k), groups=g if kind == "bconv" else None))
        elif kind == "bn":
            out += [TensorSpec(f"{path}.{t}", (o,)) for t in ("weight", "bias", "running_mean",
                                                             "running_var")]
            out.append(TensorSpec(f"{path}.num_batches_tracked", (), "int64"))
        elif kind == "prelu":
            out.append(TensorSpec(f"{path}.weight", (o,)))
        elif kind == "fprelu":
            out += [TensorSpec(f"{path}.pos_slope", (o,)), TensorSpec(f"{path}.neg_slope", (o,))]
        elif kind == "linear":
            out += [TensorSpec(f"{path}.weight", (o, i)), TensorSpec(f"{path}.bias", (o,))]
    return out


def size_of(cfg: dict) -> tuple[int, int, str]:
    """``(stored values, largest per-image activation, the module holding it)`` of a resolved
    config, computed from the numbers alone (Python integers: no overflow, no allocation). A
    config that has passed :func:`validate`'s field checks has at most ~16,000 modules to count."""
    params = 0
    act, where = 0, ""
    for path, kind, o, i, k, _, a in _layers(cfg):
        if kind in ("conv", "bconv"):
            params += o * i * k * k
        elif kind == "bn":
            params += 4 * o + 1
        elif kind == "prelu":
            params += o
        elif kind == "fprelu":
            params += 2 * o
        elif kind == "linear":
            params += o * i + o
        if a > act:
            act, where = a, path
    return params, act, where
