#!/usr/bin/env python3
"""Import cycles between the files of each crate.

A file `uses` another when it names it through `crate::`/`super::` paths
(`use crate::a::b`, `crate::a::f()`). Test modules (`#[cfg(test)] mod tests`
to the end of the file, and `tests.rs` files) are left out: tests may
reach anywhere. Prints each cycle (a strongly connected set of files) and
exits 1 if there is one.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP = re.compile(r"\b(crate|super)::\{([^}]*)\}")


def crates():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in ("target", ".git", "node_modules") and not d.startswith(".")]
        if "Cargo.toml" in filenames and os.path.isdir(os.path.join(dirpath, "src")):
            yield os.path.join(dirpath, "src")


def modules(src):
    """Module path (tuple) -> file, for every .rs file under src."""
    found = {}
    for dirpath, _, filenames in os.walk(src):
        for f in filenames:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel[:-3].split(os.sep)
            if parts[-1] in ("lib", "main") and len(parts) == 1:
                parts = []
            elif parts[-1] == "mod":
                parts = parts[:-1]
            if parts and parts[-1] == "tests":
                continue
            found[tuple(parts)] = os.path.join(dirpath, f)
    return found


def code_of(path):
    text = open(path, encoding="utf-8").read()
    cut = re.search(r"#\[cfg\(test\)\]\s*mod tests\b", text)
    if cut:
        text = text[: cut.start()]
    # Comments name paths too; they are not uses.
    return re.sub(r"//[^\n]*", "", text)


def resolve(mods, here, root, rest):
    base = list(here) if root == "super" else []
    if root == "super":
        base = base[:-1]
    parts = base + rest
    # The longest prefix that is a file.
    for n in range(len(parts), 0, -1):
        if tuple(parts[:n]) in mods:
            return tuple(parts[:n])
    return None


def edges(mods):
    out = {m: set() for m in mods}
    for m, path in mods.items():
        code = code_of(path)
        uses = [(r, p.strip("::").split("::")) for r, p in PATH.findall(code)]
        for r, group in GROUP.findall(code):
            for item in group.split(","):
                item = item.strip().split(" as ")[0]
                if item:
                    uses.append((r, re.split(r"::", item.split("{")[0].strip(":"))))
        for root, rest in uses:
            target = resolve(mods, m, root, [p for p in rest if p])
            if target is not None and target != m and target != ():
                # A parent module (mod.rs, lib.rs) re-exporting is not a use
                # of a file by its child.
                if target == m[: len(target)]:
                    continue
                out[m].add(target)
    return out


def cycles(graph):
    index, low, stack, on, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(group)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def main():
    bad = 0
    n = 0
    for src in sorted(crates()):
        n += 1
        mods = modules(src)
        for group in cycles(edges(mods)):
            bad += 1
            names = sorted(os.path.relpath(mods[m], ROOT) for m in group)
            print("import cycle: " + " <-> ".join(names))
    if bad:
        sys.exit(1)
    print(f"no import cycle between files in {n} crates")


if __name__ == "__main__":
    main()
