#!/usr/bin/env python3
"""Per-step timeline of replayed cached steps from a `cupti_trace.c` trace.

    python3 step_timeline.py trace.txt

A step starts at device 0's first node of a graph: the metadata upload (`upload_u4`, or a
host-to-device copy of at most 64 KiB). Steps are grouped by device count and upload kind;
for each group it prints, per device and node, the median start and end (us) relative to
the step's start, over every step but the first five of the group. The peer-memory sum
counts as part of the step also where it is launched after the graphs (the seventh and
eighth sessions' code; it now ends each device's graph). With driver API records
(`TRACE_API=1`), the host calls that launch graphs or kernels, or wait for streams, from 60 us
before the step's start to its end are listed the same way (times on the host's clock, which
CUPTI puts on the same timeline).
"""
import collections
import statistics
import sys


HOST_CALLS = ("cuGraphLaunch", "cuLaunchKernel", "cuStreamSynchronize", "cuCtxSetCurrent")


def main(path):
    ev = []
    with open(path) as f:
        for line in f:
            t = line.split()
            ev.append(dict(api=t[0] == "A", dev=int(t[1]), graph=int(t[3]), s=int(t[4]), e=int(t[5]),
                           name=t[6]))
    ev.sort(key=lambda x: x["s"])
    calls = [x for x in ev if x["api"] and x["name"].startswith(HOST_CALLS)]
    ev = [x for x in ev if not x["api"]]

    def short(n):
        return "splitK reduce" if "splitKreduce" in n else n[:36]

    def is_start(x):
        if x["dev"] != 0 or x["graph"] == 0:
            return False
        if x["name"] == "upload_u4":
            return True
        kind, _, size = x["name"].partition("_")
        return kind == "kind1" and size.isdigit() and int(size) <= 65536

    starts = [i for i, x in enumerate(ev) if is_start(x)]
    groups = collections.defaultdict(list)
    for a, b in zip(starts, starts[1:]):
        # Graph nodes, and the peer sum where it is launched after the graphs.
        ops = [x for x in ev[a:b] if x["graph"] > 0 or x["name"].startswith("peer_")]
        devices = len({x["dev"] for x in ops})
        upload = "kernel" if ev[a]["name"] == "upload_u4" else "copy"
        t0, t1 = ev[a]["s"], max(x["e"] for x in ops)
        host = [dict(x, dev="host") for x in calls if t0 - 60000 <= x["s"] < t1]
        groups[(devices, upload)].append((t0, ops + host))
    for (devices, upload), steps in sorted(groups.items()):
        print(f"== {devices} device(s), metadata by {upload}: {len(steps)} steps")
        spans, nodes = [], collections.defaultdict(list)
        for t0, ops in steps[5:]:
            spans.append((max(x["e"] for x in ops if x["dev"] != "host") - t0) / 1e3)
            seen = collections.Counter()
            for x in ops:
                k = (x["dev"], short(x["name"]))
                nodes[k + (seen[k],)].append(((x["s"] - t0) / 1e3, (x["e"] - t0) / 1e3))
                seen[k] += 1
        if not spans:
            continue
        print(f"   step span, median: {statistics.median(spans):.1f} us")
        rows = []
        for k, v in nodes.items():
            if len(v) > len(spans) // 3:
                a = statistics.median([s for s, _ in v])
                b = statistics.median([e for _, e in v])
                rows.append((k[0], a, b, k[1]))
        for dev, a, b, name in sorted(rows, key=lambda r: (str(r[0]), r[1])):
            print(f"   device {dev}  {name:36s} {a:7.1f} -> {b:7.1f}  ({b - a:5.1f} us)")


if __name__ == "__main__":
    main(sys.argv[1])
