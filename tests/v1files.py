"""Version-1 refbnn files written from the old specification alone (docs/format.md appendix A), for
the upgrade and the version-1 refusal tests; and the damaged global heap that makes HDF5 loop."""

import hashlib
import json
import struct
from pathlib import Path

import h5py
import numpy as np

from refbnn import reference


def seal_v1(path):
    data = Path(path).read_bytes()
    head = f"refbnn-hdf5 1\nsha256 {hashlib.sha256(data[512:]).hexdigest()}\n".encode()
    Path(path).write_bytes(head.ljust(512, b"\0") + data[512:])


def write_v1(path, model, kind="model", *, input_spec=None, class_names=None, provenance=None,
             metrics=None, checkpoint=None):
    """``model`` (a BNNResNet) as a version-1 file: vlen string attributes, a group per module,
    ``<t>_packed`` uint64 words with their eight attributes (``scale`` for mean_abs layers)."""
    state, binary = model.state_dict(), model.binary_weights()
    with h5py.File(path, "w", libver=("v110", "v110"), track_order=True, userblock_size=512) as f:
        attrs = {"format": "refbnn", "format_version": np.int64(1), "kind": kind,
                 "config": json.dumps(model.config), "input_spec": json.dumps(input_spec),
                 "class_names": json.dumps(class_names), "dataset": "mnist",
                 "metrics": json.dumps(metrics), "refbnn_version": "0.1.0",
                 "provenance": json.dumps(provenance)}
        if checkpoint is not None:
            attrs.update(epoch=np.int64(checkpoint["epoch"]),
                         rng_state=json.dumps(checkpoint["rng_state"]),
                         history=json.dumps(checkpoint["history"]))
        for k, v in attrs.items():
            f.attrs[k] = v
        m = f.create_group("model", track_order=True)
        for key, value in state.items():
            group, _, leaf = key.rpartition(".")
            g = m[group] if group in m else m.create_group(group, track_order=True)
            if key not in binary or kind != "packed":
                g.create_dataset(leaf, data=value)
            if key in binary and binary[key]["sign_at_zero"] != 0:
                words = reference.pack(np.moveaxis(value, 1, -1), 64, binary[key]["sign_at_zero"])
                ds = g.create_dataset(leaf + "_packed", data=words)
                for a, v in {"packs": leaf, "layout": "OHWI", "unpacked_shape": np.array(value.shape),
                             "groups": np.int64(binary[key]["groups"]),
                             "sign_at_zero": np.int64(binary[key]["sign_at_zero"]),
                             "word_bits": np.int64(64), "bit_order": "lsb_first",
                             "bit_one_means": np.int64(-1)}.items():
                    ds.attrs[a] = v
                if "scale" in binary[key]:
                    ds.attrs["scale"] = binary[key]["scale"]
        if checkpoint is not None:
            o = f.create_group("optimizer", track_order=True)
            o.attrs["hyperparameters"] = json.dumps(checkpoint["hyperparameters"])
            for k, v in checkpoint["optimizer_state"].items():
                o.create_dataset(k, data=v)
    seal_v1(path)


def damage_global_heap(path):
    """Grow the size field of the last object of the global heap collection (where version 1's
    string attributes live; HDF5 keeps no checksum for it) by 65 bytes and re-stamp the refbnn
    SHA-256, as a crafted file would: HDF5 1.14-2.0's attribute read then loops (issue 17)."""
    data = bytearray(Path(path).read_bytes())
    g = data.find(b"GCOL")
    size = struct.unpack_from("<Q", data, g + 8)[0]
    p, last = g + 16, None
    while p < g + size - 16:
        index = struct.unpack_from("<H", data, p)[0]
        if index == 0:
            break
        last = p
        p += 16 + (struct.unpack_from("<Q", data, p + 8)[0] + 7) // 8 * 8
    struct.pack_into("<Q", data, last + 8, struct.unpack_from("<Q", data, last + 8)[0] + 65)
    Path(path).write_bytes(bytes(data))
    seal_v1(path)
