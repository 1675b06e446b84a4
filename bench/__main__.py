"""List the benchmarks; each runs as ``python -m bench.<name>`` and prints ratios measured in the same run."""

from __future__ import annotations

import importlib
import pkgutil

import bench


def main() -> None:
    print("benchmarks (run one with: .venv/bin/python -m bench.<name> --help):")
    for module in sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")):
        doc = (importlib.import_module(f"bench.{module}").__doc__ or "").strip().splitlines()[0]
        print(f"  {module:12s} {doc}")


if __name__ == "__main__":
    main()
