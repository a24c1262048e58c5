"""Model configs: plain JSON-serializable dicts that fully describe a Bi-Real / FTBNN network.

A config is *resolved* by :func:`resolve`: defaults filled in, the width multiplier applied, the
stem chosen for the input size, and named non-linearity presets expanded to one entry per block, so
the resolved dict alone rebuilds the same network (it is what weight files store).

Fields (resolved form):

``name``                 preset name or free text
``input_shape``          ``[C, H, W]`` of one input image
``num_classes``          classifier outputs
``stem_channels``        real stem conv output channels (64 Bi-Real/FTBNN, 32 derived)
``stem_kernel``, ``stem_stride``, ``stem_pool``
                         ImageNet: 7x7/2 + 3x3/2 max-pool (baseline) or 3x3/2 + pool (derived);
                         small inputs (H < 64): 3x3/1, no pool
``bridge_channels``      derived models: a binary 3x3 bridge block from the stem width to this width
                         (``None``: no bridge; stage 1 must then match the stem width)
``widths``, ``blocks``   per stage; the first block of stages 2.. is a stride-2 block
``groups``               groups of the binary 3x3 conv in normal blocks
``reduction_groups``     groups of the stride-2 binary conv
``downsample``           shortcut of stride-2 blocks: ``"real"`` (2x2 avg-pool -> real 1x1 conv -> BN,
                         Bi-Real), ``"binary"`` (avg-pool -> binary 1x1 conv -> BN) or ``"cheap"``
                         (avg-pool -> channel duplication; no parameters; widths must double)
``scale``                ``"mean_abs"`` (Bi-Real's per-channel alpha) or ``"none"`` (FTBNN: BN absorbs it)
``nonlinearity``         one entry per block: ``"none" | "relu" | "prelu" | "fprelu"``
``nonlinearity_position`` one entry per block: ``"after_add"`` (FTBNN caption: after each basic block)
                         or ``"before_add"`` (on the residual branch, after BN)
``sign_at_zero``, ``act_grad``, ``pad_value``   binarization options of every binary conv
``width_multiplier``     scales every width (rounded); resolved form has it applied and set to 1.0
``conv_padding``         ``"symmetric"`` (PyTorch: ``k // 2`` on every side of the stem conv and the
                         3x3 binary convs, padding 1 around the stem max-pool) or ``"tf"``
                         (TensorFlow/Keras ``"same"``: output ``ceil(in / stride)``, the odd padding
                         row/column at the bottom/right, as Larq models)
``pad_values``           ``{binary conv layer name: 0 | 1 | -1}``: per-layer pad values overriding
                         ``pad_value`` (names from :func:`binary_conv_names`)
``bn_eps``               epsilon of every BatchNorm (1e-5, PyTorch's; Keras uses 1e-3)
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

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
    "conv_padding": "symmetric",
    "pad_values": {},
    "bn_eps": 1e-5,
}
CONV_PADDINGS = ("symmetric", "tf")


class ConfigError(ValueError):
    """A model config that cannot describe a valid network."""


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


def resolve(config: dict) -> dict:
    """Return the resolved, validated copy of ``config`` (see module docstring). Idempotent."""
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown config fields: {', '.join(sorted(unknown))}")
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(copy.deepcopy(config))
    c, h, w = (int(v) for v in cfg["input_shape"])
    cfg["input_shape"] = [c, h, w]
    small = min(h, w) < 64
    if cfg["stem_kernel"] is None:
        cfg["stem_kernel"] = 3 if small else int(cfg["large_stem_kernel"])
    if cfg["stem_stride"] is None:
        cfg["stem_stride"] = 1 if small else 2
    if cfg["stem_pool"] is None:
        cfg["stem_pool"] = not small
    m = float(cfg["width_multiplier"])
    if m != 1.0:
        scale_widths(cfg, m)
        cfg["width_multiplier"] = 1.0  # applied: resolving again changes nothing
    n = sum(int(b) for b in cfg["blocks"])
    nl, pos = cfg["nonlinearity"], cfg["nonlinearity_position"]
    if isinstance(nl, str):
        if nl in NONLINEARITY_PRESETS:
            nl, preset_pos = expand_nonlinearity(nl, cfg["blocks"])
            if pos == DEFAULTS["nonlinearity_position"]:
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


def validate(cfg: dict) -> None:
    """Raise :class:`ConfigError` naming the first field that cannot describe a valid network."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(f"{cfg.get('name', 'config')}: {msg}")

    need(len(cfg["widths"]) == len(cfg["blocks"]) >= 1, "widths and blocks need one entry per stage")
    need(all(int(b) >= 1 for b in cfg["blocks"]), "every stage needs at least one block")
    n = sum(cfg["blocks"])
    need(len(cfg["nonlinearity"]) == n, f"nonlinearity needs {n} entries, one per block")
    need(len(cfg["nonlinearity_position"]) == n, f"nonlinearity_position needs {n} entries")
    need(all(k in NONLINEARITIES for k in cfg["nonlinearity"]),
         f"nonlinearity entries must be one of {NONLINEARITIES}")
    need(all(p in POSITIONS for p in cfg["nonlinearity_position"]),
         f"nonlinearity_position entries must be one of {POSITIONS}")
    need(cfg["downsample"] in DOWNSAMPLES, f"downsample must be one of {DOWNSAMPLES}")
    need(cfg["scale"] in ("none", "mean_abs"), "scale must be 'none' or 'mean_abs'")
    need(cfg["sign_at_zero"] in (1, -1, 0), "sign_at_zero must be +1, -1 or 0")
    need(cfg["act_grad"] in ("approx_sign", "ste", "identity"),
         "act_grad must be approx_sign, ste or identity")
    need(cfg["pad_value"] in (0, 1, -1), "pad_value must be 0, +1 or -1")
    need(cfg["conv_padding"] in CONV_PADDINGS, f"conv_padding must be one of {CONV_PADDINGS}")
    eps = cfg["bn_eps"]
    need(isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps <= 1,
         "bn_eps must be a number in (0, 1]")
    pv = cfg["pad_values"]
    need(isinstance(pv, dict), "pad_values must be an object {binary conv name: 0 | 1 | -1}")
    need(cfg["stem_kernel"] % 2 == 1, "stem_kernel must be odd")
    need(int(cfg["num_classes"]) >= 1, "num_classes must be positive")
    prev = cfg["bridge_channels"] or cfg["stem_channels"]
    for s, width in enumerate(cfg["widths"]):
        g = cfg["groups"]
        need(width % g == 0, f"stage {s + 1} width {width} is not divisible by groups={g}")
        if s > 0:
            rg = cfg["reduction_groups"]
            need(prev % rg == 0 and width % rg == 0,
                 f"stage {s + 1}: reduction_groups={rg} must divide {prev} and {width}")
            if cfg["downsample"] == "cheap":
                need(width % prev == 0, f"cheap downsampling needs stage {s + 1} width {width} "
                     f"to be a multiple of {prev}")
        elif cfg["bridge_channels"] is None:
            need(width == cfg["stem_channels"],
                 f"stage 1 width {width} must equal stem_channels {cfg['stem_channels']} without a bridge")
        prev = width
    names = set(binary_conv_names(cfg))
    for name, v in pv.items():
        need(name in names, f"pad_values names {name!r}, not a binary conv of this network")
        need(v in (0, 1, -1) and not isinstance(v, bool), f"pad_values[{name!r}] must be 0, +1 or -1")


def binary_conv_names(cfg: dict) -> list[str]:
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


def from_json(text: str) -> dict:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"model config is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError("model config JSON must be an object")
    return resolve(cfg)


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


def binary_options(cfg: dict) -> dict:
    """Keyword arguments shared by every binary conv of the network."""
    return {k: cfg[k] for k in ("scale", "sign_at_zero", "act_grad", "pad_value")}


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
                                    cfg["nonlinearity"][index], cfg["nonlinearity_position"][index]))
            prev = width
            index += 1
        stages.append(blocks)
    return stages
