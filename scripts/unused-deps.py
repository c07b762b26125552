#!/usr/bin/env python3
"""Fails when a workspace crate lists a dependency its code never names.

A dependency is used when its crate name (dashes as underscores) appears as a path in the
crate's Rust sources (`name::`, `use name`, `name!`), or it is only there to switch on a
feature (listed in ALLOWED with why). Cheap enough for every test run, unlike building
cargo-machete on a 2-core machine.
"""
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (crate, dependency): why it is listed though no path names it.
ALLOWED = {}


def sources(crate_dir):
    for sub in ("src", "tests", "benches", "it", "examples"):
        d = crate_dir / sub
        if d.is_dir():
            yield from d.rglob("*.rs")
    if (crate_dir / "build.rs").is_file():
        yield crate_dir / "build.rs"


def main():
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text())
    unused = []
    for member in workspace["workspace"]["members"]:
        crate_dir = ROOT / member
        manifest = tomllib.loads((crate_dir / "Cargo.toml").read_text())
        text = "\n".join(p.read_text() for p in sources(crate_dir))
        for table in ("dependencies", "dev-dependencies"):
            for dep in manifest.get(table, {}):
                ident = dep.replace("-", "_")
                if re.search(rf"\b{ident}(::|!|\s*;|\s*::\{{)", text) or re.search(
                    rf"\buse\s+{ident}\b", text
                ):
                    continue
                if (member, dep) in ALLOWED:
                    continue
                unused.append(f"{member}: {table} {dep}")
    if unused:
        print("Dependencies no code uses (remove them, or say why in scripts/unused-deps.py):")
        print("\n".join(f"  {u}" for u in unused))
        sys.exit(1)


main()
