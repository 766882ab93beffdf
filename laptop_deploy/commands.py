"""One function per CLI verb: ``verb(args) -> (json_result, text)``. They only translate arguments into library
calls; all work lives in the library modules."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .errors import LaptopDeployError


def inventory(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from .inventory import build_inventory, format_inventory
    from .sources import resolve_model

    # Counting needs only the architecture: presets and folders resolve on the meta device without weights.
    source = resolve_model(args.model, materialize=False, seed=args.seed, allow_pickle=args.allow_pickle)
    inv = build_inventory(source.unet, granularity=args.granularity,
                          latent_size=tuple(args.latent_size) if args.latent_size else None)
    model = source.describe()
    title = f"{args.model} ({model['kind']}, {model['family']}): granularity {inv.granularity}"
    return {"model": model, **inv.as_dict()}, format_inventory(inv, title=title)


def _removal_names(text: str) -> list[str]:
    """``--remove`` value: comma-separated names, or @FILE holding lines, a JSON list, or {"removed": [...]}."""
    if not text.startswith("@"):
        return [n.strip() for n in text.split(",") if n.strip()]
    path = Path(text[1:])
    try:
        content = path.read_text()
    except OSError as exc:
        raise LaptopDeployError(f"--remove {text}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(content)
    except json.JSONDecodeError:
        return [line.strip() for line in content.splitlines() if line.strip() and not line.startswith("#")]
    names = data.get("removed") if isinstance(data, dict) else data
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LaptopDeployError(f"--remove {text}: expected a JSON list of names or an object with 'removed'")
    return names


def prune(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from .handcrafted import handcrafted_removal
    from .layers import check_removal, discover_layers
    from .sources import resolve_model
    from .student import make_student, prepare_output, save_student

    prepare_output(args.out, force=args.force)
    names = _removal_names(args.remove) if args.remove is not None else None
    if names == []:
        raise LaptopDeployError("--remove names no layer")
    source = resolve_model(args.model, seed=args.seed, allow_pickle=args.allow_pickle)
    if names is None:
        names = handcrafted_removal(args.preset, source.unet.config)
    layers, already = discover_layers(source.unet)
    check_removal(layers, names, removed=already)  # before any weight is freed
    before = sum(p.numel() for p in source.unet.parameters())
    student = make_student(source.unet, names)
    after = sum(p.numel() for p in student.parameters())
    save_student(student, args.out, force=args.force,
                 teacher={**source.describe(), "params": before},
                 extra={"method": f"preset:{args.preset}" if args.preset else "explicit"})
    result = {"out": str(args.out), "params_before": before, "params_after": after,
              "ratio_achieved": round(1 - after / before, 6), "removed": names}
    text = (f"removed {len(names)} layers: {before:,} -> {after:,} params "
            f"({result['ratio_achieved']:.2%} pruned); student written to {args.out}")
    return result, text
