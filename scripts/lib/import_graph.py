#!/usr/bin/env python3
"""The layering of the code, checked: no import circle between files, none
between rooms (a folder of src/, or a file at its top, as src/lib.rs lists
them), and nothing below the run (src/pipeline/) imports from it.

Reads every .rs file of src/ and crates/*/src/, takes the paths it names
outside comments (`crate::a::b`, and a file's top-level `super::x`), maps
each to the file that defines it, and prints every circle it finds, one
line each. Exits 1 when there is one. scripts/test.sh runs it.

    python3 scripts/lib/import_graph.py [ROOT]
"""
import re
import sys
from pathlib import Path

PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")


def module_files(src: Path) -> dict:
    """Module path (tuple of names) -> file, for one crate's src/."""
    mods = {}
    for f in src.rglob("*.rs"):
        rel = f.relative_to(src).with_suffix("")
        parts = list(rel.parts)
        if parts in (["lib"], ["main"]):
            parts = []
        elif parts[-1] == "mod":
            parts = parts[:-1]
        mods[tuple(parts)] = f
    return mods


def module_of(mods: dict, f: Path) -> tuple:
    return next(m for m, p in mods.items() if p == f)


def resolve(mods: dict, path: tuple):
    """The file of the longest prefix of `path` that is a module."""
    for n in range(len(path), -1, -1):
        if path[:n] in mods:
            return mods[path[:n]]
    return None


def edges_of(mods: dict, f: Path) -> set:
    here = module_of(mods, f)
    out = set()
    for line in f.read_text().splitlines():
        code = line.split("//", 1)[0]
        for root, rest in PATH.findall(code):
            names = tuple(rest.split("::")[1:])
            if root == "crate":
                target = resolve(mods, names)
            elif line.startswith("use super::") or not line.startswith(" "):
                # A file's own `super`: its parent module. (An indented
                # `super` is inside an inline module, e.g. `mod tests`,
                # and names this very file.)
                parent = here[:-1] if f.stem != "mod" else here[:-1]
                target = resolve(mods, parent + names)
            else:
                continue
            if target is not None and target != f:
                out.add(target)
    return out


def cycles(graph: dict) -> list:
    """Every elementary circle found by a depth-first walk (one per back edge)."""
    found, state, stack = [], {}, []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return found


def room_of(src: Path, f: Path):
    """The room a file belongs to: its folder under src/, or the file itself
    at the top; None for the crate root (lib.rs, main.rs)."""
    rel = f.relative_to(src)
    if len(rel.parts) == 1:
        return None if rel.stem in ("lib", "main") else rel.stem
    return rel.parts[0]


def room_graph(src: Path, graph: dict) -> dict:
    rooms = {}
    for f, targets in graph.items():
        a = room_of(src, f)
        if a is None:
            continue
        for t in targets:
            b = room_of(src, t)
            if b is not None and b != a:
                rooms.setdefault(a, set()).add(b)
    return rooms


# The rooms of src/ from the bottom up, as src/lib.rs lists them: a room
# imports only from its own level or those before it.
LEVELS = [
    {"config", "names", "ident", "state", "schedule"},
    {"workbench"},
    {"error", "retry"},
    {"source"},
    {"quality"},
    {"files"},
    {"bucket"},
    {"ledger"},
    {"pipeline"},
    {"check", "metrics", "notify", "systemd", "logging", "service_user", "manpages", "daemon"},
]


def level_of(room: str):
    return next((i for i, rooms in enumerate(LEVELS) if room in rooms), None)


# The rooms below the run: none of them may name a file of src/pipeline/.
BELOW_THE_RUN = ("src/source/", "src/quality/", "src/files/", "src/bucket/", "src/ledger/",
                 "src/error.rs", "src/retry.rs", "src/workbench/", "src/config", "src/names.rs",
                 "src/ident.rs", "src/state.rs", "src/schedule.rs")


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    srcs = [root / "src"] + sorted(p for p in (root / "crates").glob("*/src"))
    bad = 0
    for src in srcs:
        mods = module_files(src)
        graph = {f: edges_of(mods, f) for f in mods.values()}
        for c in cycles(graph):
            bad += 1
            print("import circle: " + " -> ".join(str(p.relative_to(root)) for p in c))
        rooms = room_graph(src, graph)
        for c in cycles(rooms):
            bad += 1
            print("room circle: " + " -> ".join(c))
        if src == root / "src":
            for a, targets in sorted(rooms.items()):
                for b in sorted(targets):
                    la, lb = level_of(a), level_of(b)
                    if la is None or lb is None:
                        bad += 1
                        print(f"room {a if la is None else b} is not in LEVELS (scripts/lib/import_graph.py), as src/lib.rs lists the rooms")
                    elif lb > la:
                        bad += 1
                        print(f"upward import: {a} imports {b}, a room above it in src/lib.rs")
        for f, targets in sorted(graph.items()):
            rel = str(f.relative_to(root))
            if rel.startswith(BELOW_THE_RUN):
                for t in sorted(targets):
                    if str(t.relative_to(root)).startswith("src/pipeline/"):
                        bad += 1
                        print(f"below the run, {rel} imports {t.relative_to(root)}")
    edges = sum(len(v) for v in graph.values())
    print(f"import graph: {len(srcs)} crates, {bad} circle(s) or upward import(s)" + ("" if bad else f" ({edges} file edges in the last)"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
