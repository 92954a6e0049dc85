"""One ``bench-prune`` peer in its own process: ``python prune_worker.py METHOD REQUEST.json``.

Runs under the main venv with the peer's packages on ``PYTHONPATH`` (``make bench-prune`` installs
``torch-pruning`` and ``nncf`` into ``build/peers/prune``), so the peers' imports and global state never
touch the parent. It loads the PyTorch model the bundle was built from (refused when its source no longer
hashes to the manifest's), prunes it for each requested configuration (the units each group keeps) with the
peer's own API, exports each result to ONNX with planforge's exporter, and prints one JSON line: a row per
configuration with the file and its parameters.
The parent times and scores every file the same way as planforge's own graphs.

Both peers work on the same units planforge prunes, found in the bundle's exported graph
(``passes.prune_match.unit_groups``) and matched to the module's ``Linear``/``Conv`` layers by their weights,
so a row compares methods at the same speed:

- ``torch-pruning``: the up-projections (and a gated MLP's gate, one group) are the roots of
  ``MetaPruner`` with Torch-Pruning's default ``GroupMagnitudeImportance(p=2)``, each group at the ratio
  that keeps planforge's count, every other layer ignored; its dependency graph shrinks the
  down-projections' inputs. Attention heads: q, k and v given as ``num_heads`` with ``prune_num_heads``
  (whole heads, as planforge removes them). No retraining (the issue's baseline). Taylor importance needs
  a task loss's gradients, which an embedding model without labels does not have.
- ``nncf``: ``nncf.prune(UNSTRUCTURED_MAGNITUDE_LOCAL, ratio)``, its masks applied to the weights: NNCF 3's
  pruning zeroes weights (it removes nothing); each group's layers get as large a share of zeros as the
  share of units planforge removes there, other layers stay dense.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np


def _root_layers(module, graph_path: Path):
    """Per unit group of the exported graph, the module's layers holding its up-projections and its
    down-projection (matched by weight values: the exporter renames them)."""
    import onnx
    import onnx_graphsurgeon as gs
    import torch

    from passes.prune_match import unit_groups

    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d))]
    weights = {id(m): m.weight.detach().numpy() for m in layers}

    def find(array: np.ndarray, transposed_in_graph: bool):
        for m in layers:
            w = weights[id(m)]
            candidate = w if (isinstance(m, torch.nn.Linear) and transposed_in_graph) or not isinstance(
                m, torch.nn.Linear) else w.T
            if candidate.shape == array.shape and np.array_equal(candidate, array):
                return m
        return None

    groups = []
    for group in unit_groups(gs.import_onnx(onnx.load(str(graph_path)))):
        ups = [find(np.asarray(p.weight.values), p.transposed) for p in group.ups]
        down = find(np.asarray(group.down_weight.values), group.down_transposed)
        if all(m is not None for m in ups) and down is not None:
            groups.append((group.name, tuple(ups), down, group.count, group.block > 1))
    return groups


def _torch_pruning(module, example, groups, kept: dict[str, int]):
    import torch
    import torch_pruning as tp

    roots = {m for _, ups, _, _, _ in groups for m in ups}
    ignored = [m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d,
                                                             torch.nn.Embedding)) and m not in roots]
    # per group, the ratio that leaves exactly the units planforge keeps (Torch-Pruning keeps
    # int(n * (1 - ratio)), then rounds channels down to round_to; the half unit survives both roundings):
    # the rows compare at the same shapes, so at the same speed
    ratios, heads, num_heads = {}, {}, {}
    for name, ups, _, count, is_heads in groups:
        if is_heads:  # whole heads, as planforge removes them (Torch-Pruning removes ceil(ratio * heads))
            ratio = max((count - kept.get(name, count) - 0.5) / count, 0.0)
            for m in ups:
                num_heads[m], heads[m] = count, ratio
            if ratio > 0:  # a group is only visited with a channel ratio; prune_head_dims=False keeps head sizes
                ratios[ups] = ratio
        else:
            ratios[ups] = max(1 - (kept.get(name, count) + 0.5) / count, 0.0)
    pruner = tp.pruner.MetaPruner(module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.0, pruning_ratio_dict=ratios or None, ignored_layers=ignored,
                                  round_to=8, num_heads=num_heads, prune_num_heads=bool(num_heads),
                                  prune_head_dims=False, head_pruning_ratio_dict=heads or None)
    pruner.step()
    return module


def _nncf(module, example, groups, kept: dict[str, int]):
    import nncf
    import torch

    # NNCF's own mask registry: nncf.strip(IN_PLACE) would apply the masks too, but it imports torchao (a
    # quantization dependency pruning does not need)
    from nncf.torch.function_hook.pruning.magnitude.algo import get_pruned_modules

    masks = {}
    for ratio in sorted({round(1 - kept.get(name, count) / count, 6) for name, _, _, count, _ in groups} - {0.0}):
        pruned = nncf.prune(copy.deepcopy(module), nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_LOCAL, ratio=ratio,
                            examples_inputs=example)
        masks[ratio] = {n.replace(":", "."): hook.binary_mask for n, hook in get_pruned_modules(pruned).items()}
    names = {m: name for name, m in module.named_modules()}
    with torch.no_grad():
        for group, ups, down, count, _ in groups:  # each group's layers: as many weights zeroed as units removed
            ratio = round(1 - kept.get(group, count) / count, 6)
            for m in (*ups, down) if ratio > 0 else ():
                mask = masks[ratio].get(f"{names[m]}.weight")
                if mask is None:
                    raise RuntimeError(f"nncf.prune left {names[m]}.weight unmasked")
                m.weight.mul_(mask.to(m.weight.dtype))
    return module


METHODS = {"torch-pruning": _torch_pruning, "nncf": _nncf}


def main(method: str, request_path: str) -> None:
    import torch

    from engines.bundle.store import read_manifest
    from exporter.export import example_inputs, export_onnx
    from exporter.resolve import resolve_bundle_model

    request = json.loads(Path(request_path).read_text())
    bundle = Path(request["bundle"])
    torch.set_num_threads(int(request.get("threads", 2)))
    manifest = read_manifest(bundle)
    model = manifest.model
    resolved = resolve_bundle_model(model.source, model.source_sha256, Path(request["cache_dir"]), bundle=bundle,
                                    relative=model.relative, weights=model.weights_sha256)
    if resolved.module is None:
        raise SystemExit(f"{model.source}: not a PyTorch model; {method} prunes PyTorch modules")
    base = resolved.module.eval()
    groups = _root_layers(base, bundle / "model.onnx")
    if not groups:
        raise SystemExit("no unit group of the exported graph matched the module's layers")
    example = example_inputs(resolved.input_spec)
    out = Path(request["out"])
    rows = []
    for k, config in enumerate(request["configs"]):
        module = copy.deepcopy(base)
        started = time.perf_counter()
        # no torch.no_grad(): Torch-Pruning traces its dependency graph through autograd
        pruned = METHODS[method](module, example, _root_layers(module, bundle / "model.onnx"), config["kept"])
        seconds = time.perf_counter() - started
        ratio = config["ratio"]
        path = out / f"{method}-{k}.onnx"
        export_onnx(pruned.eval(), resolved.input_spec, resolved.output_names, path)
        zeros = sum(int((p == 0).sum()) for p in pruned.parameters())
        rows.append({"method": method, "ratio": ratio, "allocation": config["allocation"], "file": str(path),
                     "prune_s": round(seconds, 2),
                     "torch_params": sum(p.numel() for p in pruned.parameters()), "torch_zeros": zeros})
    print(json.dumps(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository (run as a script)
    main(sys.argv[1], sys.argv[2])
