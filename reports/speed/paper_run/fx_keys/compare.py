"""Compare two processes' Inductor cache keys (sitecustomize.py's files): which of B's keys A also
computed, and for each of B's other graphs the parts of its key that differ from A's nearest graph.
    python3 compare.py keys_A.txt keys_B.txt"""
import re
import sys


def blocks(path):
    out = []
    for b in open(path).read().split("\n=====\n"):
        m = re.match(r"FX graph cache hash details for key (\S+):\n(.*)", b, re.S)
        if m:
            out.append((m.group(1), m.group(2).splitlines()))
    return out


def part(line):  # "[hash] attr: value" → attr (graph code lines have no hash)
    m = re.match(r"\[\S+\] ([^:]+):", line)
    return m.group(1) if m else "graph code"


a, b = blocks(sys.argv[1]), blocks(sys.argv[2])
keys_a = {k for k, _ in a}
print(f"A: {len(a)} keys, B: {len(b)} keys, B's keys A computed too: {sum(k in keys_a for k, _ in b)}")
for i, (k, lines) in enumerate(b):
    if k in keys_a or not a:
        continue
    near_k, near = max(a, key=lambda x: len(set(x[1]) & set(lines)))
    diff_a, diff_b = set(near) - set(lines), set(lines) - set(near)
    parts = sorted({part(x) for x in diff_a | diff_b})
    print(f"B graph {i} ({k[:12]}), nearest A {near_k[:12]}: {len(diff_a)}/{len(diff_b)} lines differ, in {parts}")
    for x in sorted(diff_a)[:4]:
        print("   A:", x[:300])
    for x in sorted(diff_b)[:4]:
        print("   B:", x[:300])
