#!/usr/bin/env python3
"""Summary of one tensor-core decode launch's per-CTA timeline.

    python3 decode_timeline.py bench-output.txt

The input is the output of a bench built with `-DATTNRT_DECODE_TIMELINE=1` (through an
`ATTNRT_NVCC` wrapper that adds the define): lines `TL cta item kv_head sm t0 .. t5`, the
global timer (ns) of thread 0 of each CTA at its start, once its first tile is issued, once
that tile has landed, at the end of its key loop, before its epilogue and at its end. Times
below are microseconds from the launch's first CTA start; each row gives the minimum, the
10th, 25th, 50th, 75th and 90th percentiles and the maximum over the CTAs.

It answers where a launch's time goes: how long CTAs wait for their first tile (prologue),
how long the epilogue takes, whether CTAs end together, and whether some SMs finish their
CTAs earlier than others (the last end of each SM's CTAs), which decides whether balancing
work across SMs could shorten the launch.
"""
import collections
import sys


def percentiles(values):
    v = sorted(values)
    return " ".join(
        "%7.1f" % v[int(q * (len(v) - 1))] for q in (0, 0.1, 0.25, 0.5, 0.75, 0.9, 1)
    )


def main(path):
    ctas = []
    for line in open(path):
        if line.startswith("TL "):
            f = line.split()
            ctas.append((int(f[2]), int(f[3]), int(f[4]), [int(x) for x in f[5:11]]))
    if not ctas:
        sys.exit(f"{path}: no TL lines (a build without -DATTNRT_DECODE_TIMELINE=1?)")
    t0 = min(c[3][0] for c in ctas)
    us = lambda t: (t - t0) / 1e3
    span = max(us(c[3][5]) for c in ctas)
    print(f"{len(ctas)} CTAs, launch span {span:.1f} us")
    print("                      min     10%     25%     50%     75%     90%     max")
    rows = [
        ("start", lambda t: us(t[0])),
        ("end", lambda t: us(t[5])),
        ("prologue (to tile 0)", lambda t: (t[2] - t[0]) / 1e3),
        ("key loop", lambda t: (t[3] - t[2]) / 1e3),
        ("epilogue", lambda t: (t[5] - t[3]) / 1e3),
    ]
    for name, f in rows:
        print(f"  {name:20}{percentiles([f(c[3]) for c in ctas])}")
    by_sm = collections.defaultdict(list)
    for c in ctas:
        by_sm[c[2]].append(c)
    print(f"  {'SM last end':20}{percentiles([max(us(c[3][5]) for c in v) for v in by_sm.values()])}")
    print(f"  {'CTAs per SM':20}{percentiles([len(v) for v in by_sm.values()])}")
    active = [0] * (int(span) + 2)
    for c in ctas:
        for t in range(int(us(c[3][0])), int(us(c[3][5])) + 1):
            active[t] += 1
    print("  CTAs running, every 10 us:", " ".join(str(a) for a in active[::10]))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
