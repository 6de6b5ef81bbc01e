#!/usr/bin/env python3
"""Counts the architecture figures issue 20 tracks, so before/after numbers come from one command.

    python3 tests/arch_counts.py            # summary
    python3 tests/arch_counts.py -v         # with the offending lines

Layers are top-level modules of `src/` (a folder or a file). An import "runs back up" when it
belongs to a cycle between top-level modules (two modules that reach each other).
"""
import os
import re
import sys
from collections import defaultdict

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
VERBOSE = "-v" in sys.argv

# The HTTP edge, where ApiError belongs: every `routes.rs` or file under a `routes/` folder,
# the HTTP building blocks (`http/`), the router (`api.rs`), the authentication middleware
# (`tenancy.rs`) and the error types themselves.
EDGE_MODULES = ("http", "error", "api", "tenancy")
# Modules that own a table of their own outside the capability folders (keys, idempotency
# records, migrations): counted apart from capability SQL outside store.rs.
INFRA_MODULES = ("http", "signing", "db", "embedded_pg")


def is_store(rel):
    parts = rel.split(os.sep)
    return parts[-1] == "store.rs" or "store" in parts[:-1]


def is_edge(rel):
    parts = rel.split(os.sep)
    return parts[-1] == "routes.rs" or "routes" in parts[:-1] or top(rel) in EDGE_MODULES


def rust_files():
    for root, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".rs"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, SRC)
                if rel.startswith("bin" + os.sep) or rel == "main.rs":
                    continue
                yield rel, open(path, encoding="utf-8").read()


def top(rel):
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def strip_tests(text):
    # Unit-test modules may reach anywhere; count production code only, without comments.
    idx = text.find("#[cfg(test)]")
    text = text if idx < 0 else text[:idx]
    return "\n".join("" if l.lstrip().startswith("//") else l for l in text.splitlines())


files = {rel: strip_tests(text) for rel, text in rust_files()}
modules = sorted({top(r) for r in files})

# 1. ApiResult/ApiError below the edge.
below = []
for rel, text in files.items():
    if is_edge(rel):
        continue
    if re.search(r"\bApi(Result|Error)\b", text):
        below.append(rel)

# 2. String fields holding closed sets.
CLOSED = r"(status|channel|purpose|priority|provider|outcome|direction|state|kind|role|mode|author|source_kind|reason_kind)"
string_fields = []
for rel, text in files.items():
    for i, line in enumerate(text.splitlines(), 1):
        if re.match(r"\s*(pub(\([a-z]+\))?\s+)?" + CLOSED + r"(?!\w*_(id|url|reason)\b)\w*\s*:\s*(Option<)?String\b", line):
            string_fields.append(f"{rel}:{i}: {line.strip()}")

# 3. Imports between top-level modules, and those inside cycles.
edges = defaultdict(list)  # (a, b) -> lines
for rel, text in files.items():
    a = top(rel)
    for i, line in enumerate(text.splitlines(), 1):
        for m in re.finditer(r"\bcrate::([a-z_]+)", line):
            b = m.group(1)
            if b != a and b in modules:
                edges[(a, b)].append(f"{rel}:{i}")
graph = defaultdict(set)
for a, b in edges:
    graph[a].add(b)


def reach(src):
    seen, stack = set(), [src]
    while stack:
        n = stack.pop()
        for m in graph[n]:
            if m not in seen:
                seen.add(m)
                stack.append(m)
    return seen


reachable = {m: reach(m) for m in modules}
cyclic = {(a, b): lines for (a, b), lines in edges.items() if a in reachable[b]}
cycle_modules = sorted({a for a, _ in cyclic})
mutual = sorted({tuple(sorted((a, b))) for (a, b) in edges if (b, a) in edges})

# 4. Queries outside store files.
QUERY = re.compile(r"sqlx::query(_as|_scalar)?(!|::<|\()|\bquery(_as|_scalar)?(_unchecked)?!\(|QueryBuilder::")
outside = []
outside_infra = []
runtime = checked = 0
for rel, text in files.items():
    for i, line in enumerate(text.splitlines(), 1):
        for m in QUERY.finditer(line):
            if "!" in m.group(0):
                checked += 1
            else:
                runtime += 1
            if not is_store(rel):
                (outside_infra if top(rel) in INFRA_MODULES else outside).append(f"{rel}:{i}")

# 5. Test binaries.
tests_dir = os.path.join(SRC, "..", "tests")
binaries = [f for f in os.listdir(tests_dir) if f.endswith(".rs")] + [
    d for d in os.listdir(tests_dir) if os.path.isfile(os.path.join(tests_dir, d, "main.rs"))
]

print(f"files returning ApiResult/ApiError below the HTTP edge: {len(below)}")
if VERBOSE:
    for f in sorted(below):
        print("   ", f)
print(f"String fields holding closed sets: {len(string_fields)}")
if VERBOSE:
    for f in string_fields:
        print("   ", f)
print(f"imports between top-level modules: {sum(len(v) for v in edges.values())}")
print(f"imports inside module cycles: {sum(len(v) for v in cyclic.values())} "
      f"(modules in cycles: {', '.join(cycle_modules) or 'none'})")
print(f"module pairs importing each other: {len(mutual)}")
if VERBOSE:
    for a, b in mutual:
        print(f"    {a} <-> {b}: {len(edges[(a, b)])} / {len(edges[(b, a)])}")
print(f"queries outside store.rs: {len(outside)} in capability folders, "
      f"{len(outside_infra)} in infrastructure modules owning their table ({', '.join(INFRA_MODULES)})")
if VERBOSE:
    for f in outside + outside_infra:
        print("   ", f)
print(f"queries: runtime {runtime}, checked at build time {checked}")
print(f"test binaries: {len(binaries)}")
