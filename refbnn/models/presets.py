"""Named model presets. Each is a partial config; :func:`refbnn.models.get_config` resolves it.

* ``birealnet18/34`` — Bi-Real Net (official code): 7x7 stem, real 1x1 downsampling shortcuts,
  per-channel mean-|W| weight scale, no explicit non-linearity.
* ``ftbnn18/34`` — the FTBNN baseline: Bi-Real with the scale absorbed by BatchNorm and an explicit
  non-linearity per block (default placement ``relu_stage_end``; see docs/models.md for why).
* ``ftbnn18/34_purified`` — binary-purified baseline: the downsampling 1x1 convs are binary too.
* ``ftbnn18/34_g{1,2,4}`` — derived models: 3x3 stem with 32 channels, a binary bridge, grouped
  normal blocks, stride-2 reduction blocks with 2 groups (``g`` for ``g > 2``) and the cheap
  (parameter-free) downsampling shortcut. Stage widths are ``w, 2w, 4w, 8w`` with ``w`` chosen so that
  the ImageNet budget is about 90M OPs (Layer=18) or 135M OPs (Layer=34); ``tests/test_models.py``
  checks the totals.

Any preset takes overrides, e.g. ``get_config("ftbnn18", input_shape=[1, 28, 28], num_classes=10,
width_multiplier=0.25)``: inputs smaller than 64 pixels get a 3x3 stride-1 stem and no max-pool
(``stem_pool=True`` adds the pool back, as the training CLI's default model does).
"""

BIREAL = {"scale": "mean_abs", "nonlinearity": "none", "downsample": "real"}
FTBNN = {"scale": "none", "nonlinearity": "relu_stage_end", "downsample": "real"}


def _derived(blocks, groups, width):
    return {**FTBNN, "blocks": blocks, "groups": groups, "reduction_groups": max(2, groups),
            "stem_channels": 32, "large_stem_kernel": 3, "bridge_channels": width,
            "widths": [width, 2 * width, 4 * width, 8 * width], "downsample": "cheap"}


L18, L34 = [4, 4, 4, 4], [6, 8, 12, 6]

# stage-1 widths solved for the budget (the multiple of max(2, groups) nearest the target)
DERIVED_WIDTHS = {(18, 1): 112, (18, 2): 154, (18, 4): 216, (34, 1): 96, (34, 2): 134, (34, 4): 188}

PRESETS = {
    "birealnet18": {**BIREAL, "blocks": L18},
    "birealnet34": {**BIREAL, "blocks": L34},
    "ftbnn18": {**FTBNN, "blocks": L18},
    "ftbnn34": {**FTBNN, "blocks": L34},
    "ftbnn18_purified": {**FTBNN, "blocks": L18, "downsample": "binary"},
    "ftbnn34_purified": {**FTBNN, "blocks": L34, "downsample": "binary"},
}
for (_layers, _g), _w in DERIVED_WIDTHS.items():
    PRESETS[f"ftbnn{_layers}_g{_g}"] = _derived(L18 if _layers == 18 else L34, _g, _w)
