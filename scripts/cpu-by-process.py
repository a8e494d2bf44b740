#!/usr/bin/env python3
"""Run a command and report the CPU seconds each process on the machine
used while it ran (RabbitMQ's beam.smp, redis-server, and each conveyor
process by its subcommand), largest first.

    scripts/cpu-by-process.py target/release/conveyor bench --spawn --shape single --jobs 30000

Process CPU is read from /proc/<pid>/stat before, every 0.2 s during (to
catch processes that exit), and after the command. Its own polling shows
as python3 (about 3% of a core)."""
import os, subprocess, sys, time, collections
HZ = os.sysconf('SC_CLK_TCK')
def snap():
    out = {}
    for pid in os.listdir('/proc'):
        if not pid.isdigit(): continue
        try:
            with open(f'/proc/{pid}/stat') as f: st = f.read()
            with open(f'/proc/{pid}/cmdline','rb') as f: cmd = f.read().split(b'\0')
        except OSError: continue
        rest = st[st.rindex(')')+2:].split()
        ticks = int(rest[11]) + int(rest[12])
        name = os.path.basename(cmd[0].decode(errors='replace')) if cmd and cmd[0] else '?'
        if name == "conveyor" and len(cmd) > 1: name = "conveyor " + " ".join(c.decode() for c in cmd[1:] if c and not c.startswith(b"-") and b"/" not in c)[:30]
        out[pid] = (name, ticks)
    return out
a = snap(); t0 = time.time()
p = subprocess.Popen(sys.argv[1:])
# sample periodically to catch child processes that exit
seen = {}
while p.poll() is None:
    for pid, v in snap().items(): seen[pid] = v
    time.sleep(0.2)
for pid, v in snap().items(): seen[pid] = v
wall = time.time() - t0
agg = collections.Counter()
for pid, (name, ticks) in seen.items():
    base = a.get(pid, (name, 0))[1]
    agg[name] += (ticks - base) / HZ
print(f"wall {wall:.1f}s")
for name, s in agg.most_common(8):
    if s > 0.05: print(f"  {name:30s} {s:7.2f} cpu-s  {100*s/wall:5.1f}%")
