"""A before/after table of two ``python -m kvquant.aot --json`` reports, for RESULTS.md.

One row per (arch, kernel, head_dim, layout, tile), the worst case over the variants that fall
in it (dtypes, KV split or not, key tiles): max registers, max spill bytes, max shared memory.

    uv run python benchmarks/aot_table.py before.json after.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import markdown_table


def group(results: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    out: dict[tuple[Any, ...], dict[str, Any]] = defaultdict(
        lambda: {"regs": 0, "spill": 0, "shared": 0, "n": 0, "warps": set(), "stages": set()}
    )
    for r in results:
        spec = dict(kv.split("=", 1) for kv in r["specialization"].split() if "=" in kv)
        tile = {"16": "decode", "64": "prefill"}.get(spec.get("ROWS", ""), "-")
        layout = r.get("layout") or {0: "bits0", 8: "int8", 4: "int4"}.get(r["bits"], "?")
        if r["kernel"] == "combine":
            layout = "-"
        g = out[(r["arch"], r["kernel"], r["head_dim"], layout, tile)]
        g["regs"] = max(g["regs"], r["registers"] or 0)
        g["spill"] = max(g["spill"], r["spill_bytes"] or 0)
        g["shared"] = max(g["shared"], r["shared_bytes"] or 0)
        g["n"] += 1
        g["warps"].add(r["num_warps"])
        g["stages"].add(r["num_stages"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args()
    before = group(json.loads(args.before.read_text()))
    after = group(json.loads(args.after.read_text()))
    rows = []
    for key in sorted(set(before) | set(after), key=str):
        if key[1] not in ("attention", "combine", "seal"):
            continue
        b, a = before.get(key), after.get(key)

        def cells(x: dict[str, Any] | None) -> list[Any]:
            if x is None:
                return ["-", "-", "-", "-"]
            ws = "/".join(map(str, sorted(x["warps"])))
            st = "/".join(map(str, sorted(x["stages"])))
            return [x["regs"], x["spill"], f"{x['shared'] // 1024} KB", f"{ws} w, {st} s"]

        rows.append([f"sm_{key[0]}", key[1], key[2], key[3], key[4], *cells(b), *cells(a)])
    headers = ["arch", "kernel", "D", "layout", "tile",
               "regs before", "spill B before", "shared before", "launch before",
               "regs after", "spill B after", "shared after", "launch after"]
    print(markdown_table(headers, rows))
    for name, data in (("before", args.before), ("after", args.after)):
        res = json.loads(data.read_text())
        for arch in sorted({r["arch"] for r in res}):
            mine = [r for r in res if r["arch"] == arch]
            print(f"\n{name}, sm_{arch}: {len(mine)} specializations, "
                  f"{sum(not r['ok'] for r in mine)} failed, "
                  f"{sum(bool(r['spill_bytes']) for r in mine if r['head_dim'] <= 128)} spill at "
                  f"head_dim <= 128, {sum(bool(r['spill_bytes']) for r in mine if r['head_dim'] > 128)}"
                  f" at head_dim 256, max shared {max(r['shared_bytes'] or 0 for r in mine) // 1024} KB")


if __name__ == "__main__":
    main()
