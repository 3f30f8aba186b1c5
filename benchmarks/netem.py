"""An emulated network for K ranks on one machine (root only): one network namespace per rank,
all joined by a bridge, each rank's link limited to a rate and delayed by a one-way latency.

    python benchmarks/netem.py up 4 --rate 100mbit --delay-ms 2
    python benchmarks/netem.py check 2 --rate 1gbit --delay-ms 5   # round trip and throughput 0 -> 1
    python benchmarks/netem.py down

What is emulated:

* Rank i lives in namespace ``{prefix}{i}`` with one interface ``{prefix}{i}`` at 10.77.0.(i+1)/24
  (nothing else: IPv6 off, no route out, no other address). A veth pair joins it to port
  ``{prefix}{i}p`` of the bridge ``{prefix}br``, which lives in namespace ``{prefix}br``; the root
  namespace and its interfaces are not touched.
* Bandwidth: a tbf qdisc on the rank's interface (its egress) and on its bridge port (its
  ingress), both at the rate: a full-duplex link of that rate per rank into an ideal switch. The
  queue holds 8 MiB. The token bucket holds one packet (it must hold the largest), so after an
  idle spell one packet leaves at once instead of at the link rate: the emulated link is up to
  one packet time (MTU / rate) faster than a real one per burst.
* Latency: every packet into a rank (its ingress, iptables PREROUTING) is held for the one-way
  delay d by a userspace NFQUEUE delayer (real-time priority) in that namespace; the kernel has no
  netem. Every packet crosses exactly one ingress, so a round trip is 2d. The delay is applied at
  ingress rather than egress: a packet held at egress still counts against the sender's TCP
  small-queue budget, which capped a 1 Gbit/s, 5 ms link at about 380 Mbit/s.
* MTU: by default the largest of 1500..65000 (in steps of 1000) whose packet takes at most 0.75 ms
  at the rate: 9000 at 100 Mbit/s, 65000 at 1 Gbit/s and on unlimited links. Small packets keep
  the bucket error small; large ones keep the Python delayer's packet rate low (at MTU 1500 it
  tops out near 450 Mbit/s; at MTU 9000 and 1 Gbit/s it needs most of a CPU per link).
* TCP's slow start after idle is off in the namespaces, so a link that was idle between two
  averages starts at full speed (as on a tuned cluster).

Two tiers (``workers_per_block`` K'): the ranks of each block of K' share a switch (a bridge of
their own) and the switches join the core bridge through one uplink each (a veth pair): the
block's nodes talk over their rank links alone, and all traffic between blocks crosses both
blocks' uplinks, limited to the outer link's rate in each direction and delayed by its d (the
delayer of a rank holds packets from the other blocks for the outer d, from its own block for the
inner one). A two-node cluster of K' GPUs each: fast links inside a node, one slow link between.

``up`` leaves the network in place until ``down``; the ``Network`` class (used by
``benchmarks/network.py``) removes everything on exit, Ctrl-C, SIGTERM and exceptions.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import math
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUBNET = "10.77.0"
QUEUE = 0  # NFQUEUE number (per namespace)
QUEUE_BYTES = 8 * 2**20
IPTABLES = "iptables-legacy"  # the kernel has xt_NFQUEUE but no nft queue expression
MAX_PACKET_SECONDS = 0.75e-3  # the automatic MTU's packet time at the link rate


def parse_rate(rate: str) -> float:
    """Bytes per second of a tc rate (imported lazily: the delayer must not load torch)."""
    from localsgd.cost_model import parse_rate as parse

    return parse(rate)


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(f"{cmd[0]} not found (apt-get install -y iproute2 iptables)") from None
    if check and result.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {result.stderr.strip() or result.returncode}")
    return result


@dataclass(frozen=True)
class Link:
    """Each rank's link: ``rate`` in tc notation (``None``: unlimited), one-way ``delay_ms``."""

    rate: str | None = None
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.rate is not None:
            parse_rate(self.rate)
        if not self.delay_ms >= 0:
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms!r}")

    @property
    def bits_per_second(self) -> float | None:
        return None if self.rate is None else parse_rate(self.rate) * 8

    def auto_mtu(self) -> int:
        """The largest MTU (1500..65000, steps of 1000) whose packet takes <= 0.75 ms at the rate."""
        if self.rate is None:
            return 65000
        mtu = int(parse_rate(self.rate) * MAX_PACKET_SECONDS) // 1000 * 1000
        return min(65000, max(1500, mtu))

    def __str__(self) -> str:
        rate = "unlimited" if self.rate is None else self.rate
        return f"{rate}, d={self.delay_ms:g} ms"


class Network:
    """K namespaces on a bridge. Use as a context manager; ``shape()`` sets the links.

    Args:
        workers: K.
        prefix: namespace and interface names start with it.
        mtu: fixed MTU of every interface; None (default): ``Link.auto_mtu()`` of each link.
    """

    def __init__(
        self, workers: int, prefix: str = "lsgd", mtu: int | None = None, workers_per_block: int | None = None
    ) -> None:
        if workers < 1 or workers > 200:
            raise ValueError(f"workers must be between 1 and 200, got {workers}")
        if workers_per_block is not None and not (
            1 <= workers_per_block < workers and workers % workers_per_block == 0
        ):
            raise ValueError(
                f"workers_per_block must divide workers = {workers} and be less, got {workers_per_block}"
            )
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError(f"prefix must be 1-8 lowercase letters or digits, got {prefix!r}")
        if mtu is not None and not 576 <= mtu <= 65000:
            raise ValueError(f"mtu must be between 576 and 65000, got {mtu}")
        self.workers, self.prefix, self.fixed_mtu = workers, prefix, mtu
        self.workers_per_block = workers_per_block
        self.mtu = 1500  # what the interfaces have now
        self.link = Link()
        self.outer: Link | None = None  # the uplinks' link, two tiers only
        self._delayers: list[subprocess.Popen] = []
        self._up = False

    # --- names -------------------------------------------------------------------------------

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    def namespace(self, rank: int) -> str:
        return f"{self.prefix}{rank}"

    def interface(self, rank: int) -> str:
        return f"{self.prefix}{rank}"

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    def exec(self, rank: int) -> list[str]:
        """Command prefix that runs a program in rank ``rank``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(rank)]

    def namespaces(self) -> list[str]:
        return [self.bridge] + [self.namespace(i) for i in range(self.workers)]

    @property
    def blocks(self) -> int:
        return 1 if self.workers_per_block is None else self.workers // self.workers_per_block

    def block(self, rank: int) -> int:
        return 0 if self.workers_per_block is None else rank // self.workers_per_block

    def switch(self, block: int) -> str:
        """The bridge rank ports join: the core bridge, or their block's switch (two tiers)."""
        return self.bridge if self.workers_per_block is None else f"{self.prefix}s{block}"

    def uplinks(self) -> list[tuple[str, str]]:
        """(switch end, core end) of each block's uplink (two tiers; both in the bridge namespace)."""
        if self.workers_per_block is None:
            return []
        return [(f"{self.prefix}u{j}", f"{self.prefix}d{j}") for j in range(self.blocks)]

    # --- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> Network:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("network emulation needs root (network namespaces, tc, iptables)")
        taken = set(existing_namespaces(self.prefix)) & set(self.namespaces())
        if taken:
            raise RuntimeError(
                f"namespaces {sorted(taken)} exist already; remove them with "
                f"`python benchmarks/netem.py down --prefix {self.prefix}`"
            )
        atexit.register(self.down)
        _exit_on_signals()
        self._up = True
        try:
            self._create()
        except BaseException:
            self.down()
            raise

    def _create(self) -> None:
        br = self.bridge
        for ns in self.namespaces():
            run("ip", "netns", "add", ns)
            # IPv4 only (no link-local IPv6 addresses or their chatter); no slow start after idle.
            run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1", "net.ipv4.tcp_slow_start_after_idle=0")  # fmt: skip
        switches = dict.fromkeys([br, *(self.switch(j) for j in range(self.blocks))])
        for bridge in switches:
            run("ip", "-n", br, "link", "add", bridge, "type", "bridge")
            run("ip", "-n", br, "link", "set", bridge, "up")
        for j, (up, down) in enumerate(self.uplinks()):
            run("ip", "-n", br, "link", "add", up, "type", "veth", "peer", "name", down)
            run("ip", "-n", br, "link", "set", up, "master", self.switch(j), "up")
            run("ip", "-n", br, "link", "set", down, "master", br, "up")
        for i in range(self.workers):
            ns, dev = self.namespace(i), self.interface(i)
            run("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", f"{dev}p", "netns", br)
            run("ip", "-n", br, "link", "set", f"{dev}p", "master", self.switch(self.block(i)), "up")
            run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", dev, "up")

    def down(self) -> None:
        """Stop the delayers and delete the namespaces (with their interfaces, qdiscs and rules).
        Safe to call more than once."""
        if not self._up:
            return
        self._up = False
        self._stop_delayers()
        remove(self.namespaces())

    # --- shaping -----------------------------------------------------------------------------

    def shape(self, link: Link, outer: Link | None = None) -> None:
        """Set every rank's link (rate and delay), and with two tiers the uplinks' (``outer``),
        replacing the previous setting."""
        if not self._up:
            raise RuntimeError("the network is not up")
        if (outer is None) != (self.workers_per_block is None):
            raise ValueError("an outer link is for two tiers (workers_per_block), and two tiers need one")
        self._stop_delayers()
        links = [link] if outer is None else [link, outer]
        self._set_mtu(self.fixed_mtu or min(x.auto_mtu() for x in links))
        for i in range(self.workers):
            ns, dev = self.namespace(i), self.interface(i)
            for netns, device in ((ns, dev), (self.bridge, f"{dev}p")):
                self._tbf(netns, device, link)
            run(*self.exec(i), IPTABLES, "-t", "mangle", "-F", "PREROUTING")  # our namespace: ours alone
            for queue, (sources, delay_ms) in enumerate(self._delays(i, link, outer)):
                if delay_ms > 0:
                    match = ["-s", ",".join(sources)] if sources else []
                    run(*self.exec(i), IPTABLES, "-t", "mangle", "-A", "PREROUTING", "-i", dev, *match,
                        "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass")  # fmt: skip
                    self._delayers.append(self._start_delayer(i, delay_ms, queue))
        for up, down in self.uplinks():
            for device in (up, down):
                self._tbf(self.bridge, device, outer)
        self.link, self.outer = link, outer

    def _delays(self, rank: int, link: Link, outer: Link | None) -> list[tuple[list[str], float]]:
        """(source addresses, one-way delay) per queue of a rank's ingress; no addresses: all."""
        if outer is None:
            return [([], link.delay_ms)]
        mine = self.block(rank)
        inner = [self.address(i) for i in range(self.workers) if self.block(i) == mine and i != rank]
        other = [self.address(i) for i in range(self.workers) if self.block(i) != mine]
        return [(inner, link.delay_ms), (other, outer.delay_ms)]

    def _tbf(self, netns: str, device: str, link: Link) -> None:
        run("tc", "-n", netns, "qdisc", "del", "dev", device, "root", check=False)
        if link.rate is not None:
            run("tc", "-n", netns, "qdisc", "add", "dev", device, "root", *self.tbf(link))

    def _set_mtu(self, mtu: int) -> None:
        devices = []
        for i in range(self.workers):
            devices += [(self.namespace(i), self.interface(i)), (self.bridge, f"{self.interface(i)}p")]
        devices += [(self.bridge, dev) for pair in self.uplinks() for dev in pair]
        bridges = dict.fromkeys([self.bridge, *(self.switch(j) for j in range(self.blocks))])
        for ns, dev in [*devices, *((self.bridge, b) for b in bridges)]:
            run("ip", "-n", ns, "link", "set", "dev", dev, "mtu", str(mtu))
        self.mtu = mtu

    def tbf(self, link: Link) -> list[str]:
        """tbf arguments: the bucket holds one full packet (it must, or tbf drops it)."""
        # Ethernet header, plus slack: tc stores the bucket in whole microseconds at the rate, and a
        # bucket smaller than a packet makes tbf drop every full-size packet.
        burst = self.mtu + 14 + max(100, math.ceil(2e-6 * link.bits_per_second / 8))
        rate = f"{int(link.bits_per_second)}bit"
        return ["tbf", "rate", rate, "burst", str(burst), "limit", str(QUEUE_BYTES)]

    def _start_delayer(self, rank: int, delay_ms: float, queue: int = QUEUE) -> subprocess.Popen:
        cmd = [*self.exec(rank), sys.executable, "-u", __file__, "delayer", "--delay-ms", str(delay_ms),
               "--queue", str(queue)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            proc.kill()
            raise RuntimeError(
                f"the delayer in {self.namespace(rank)} did not start (is NetfilterQueue installed?)"
            )
        return proc

    def _stop_delayers(self) -> None:
        for proc in self._delayers:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._delayers:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._delayers = []

    def drops(self) -> int:
        """Packets the qdiscs dropped so far (none on a correctly emulated link)."""
        total = 0
        for ns in self.namespaces():
            out = run("tc", "-s", "-n", ns, "qdisc", "show", check=False).stdout
            total += sum(int(n) for n in re.findall(r"dropped (\d+)", out))
        return total

    def delayers_alive(self) -> bool:
        return all(p.poll() is None for p in self._delayers)


def existing_namespaces(prefix: str) -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if re.fullmatch(rf"{re.escape(prefix)}(br|[0-9]+)", n)]


def remove(namespaces: list[str]) -> None:
    """End the processes inside these namespaces (ours: delayers, ranks) by PID, then delete them."""
    present = set(run("ip", "netns", "list", check=False).stdout.split())
    namespaces = [ns for ns in namespaces if ns in present]
    pids = []
    for ns in namespaces:
        pids += [int(p) for p in run("ip", "netns", "pids", ns, check=False).stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
    for ns in namespaces:
        result = run("ip", "netns", "del", ns, check=False)
        if result.returncode and ns in run("ip", "netns", "list", check=False).stdout.split():
            print(f"netem: could not delete namespace {ns}: {result.stderr.strip()}", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie child of ours counts as gone
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


def _exit_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit, so that ``finally`` blocks and atexit run."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, handler)


# --- the delayer (runs inside a namespace) --------------------------------------------------


def delayer(delay_ms: float, queue: int = QUEUE) -> None:
    """Hold every queued packet for ``delay_ms``, then accept it (FIFO: the delay is constant)."""
    from netfilterqueue import COPY_META, NetfilterQueue

    with contextlib.suppress(PermissionError, OSError):  # keep the delay exact when the CPUs are busy
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    delay = delay_ms / 1e3
    held: deque = deque()

    def hold(packet) -> None:
        held.append((time.monotonic() + delay, packet))

    nfq = NetfilterQueue()
    nfq.bind(queue, hold, max_len=65536, mode=COPY_META)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd = nfq.get_fd()
    print("ready", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # whoever started us may stop reading
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now:
            held.popleft()[1].accept()
        timeout = held[0][0] - now if held else None
        if select.select([fd], [], [], timeout)[0]:
            nfq.run(block=False)


# --- check: round trip and throughput between rank 0 and rank 1 -----------------------------


def _serve(port: int) -> None:
    """Echo server in rank 1: 'p' -> echo one byte; 'b' + 8-byte length -> read that many, reply 'k'."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("", port))
    srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(2**20)
    while True:
        op = conn.recv(1)
        if not op or op == b"q":
            return
        if op == b"p":
            conn.sendall(b"p")
        else:
            n = int.from_bytes(_recv_exact(conn, 8), "little")
            while n:
                n -= conn.recv_into(buf, min(n, len(buf)))
            conn.sendall(b"k")


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


def _client(host: str, port: int, sizes: list[int], repeats: int) -> None:
    conn = socket.create_connection((host, port), timeout=60)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(3):  # grow TCP's windows first, as a long-lived connection has them
        conn.sendall(b"b" + max(sizes).to_bytes(8, "little") + bytes(max(sizes)))
        _recv_exact(conn, 1)
    rtts = []
    for _ in range(repeats * 4):
        start = time.perf_counter()
        conn.sendall(b"p")
        _recv_exact(conn, 1)
        rtts.append(time.perf_counter() - start)
    print(f"round trip (1 byte): median {1e3 * statistics.median(rtts):.3f} ms, min {1e3 * min(rtts):.3f} ms")
    for size in sizes:
        payload = bytes(size)
        times = []
        for _ in range(repeats + 1):  # the first one warms up the connection
            start = time.perf_counter()
            conn.sendall(b"b" + size.to_bytes(8, "little") + payload)
            _recv_exact(conn, 1)
            times.append(time.perf_counter() - start)
        t = statistics.median(times[1:])
        rate = size * 8 / t / 1e6
        print(f"{size:>10} B one way + 1-byte reply: median {1e3 * t:8.2f} ms  ({rate:8.1f} Mbit/s)")
    conn.sendall(b"q")


def check(net: Network, sizes: list[int], repeats: int) -> None:
    """Round trip and bulk transfer from rank 0 to rank 1 (with two tiers: to the first rank of the
    next block, across the uplinks) over plain TCP (no torch)."""
    if net.workers < 2:
        raise ValueError("check needs at least 2 ranks")
    port, peer = 29400, net.workers_per_block or 1
    server = subprocess.Popen(
        [*net.exec(peer), sys.executable, "-u", __file__, "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the check server did not start")
        cmd = [sys.executable, "-u", __file__, "client", "--host", net.address(peer), "--port", str(port),
               "--repeats", str(repeats), "--sizes", *map(str, sizes)]  # fmt: skip
        subprocess.run([*net.exec(0), *cmd], check=True, timeout=600)
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create K namespaces on a bridge and shape their links (until `down`)")
    up.add_argument("workers", type=int, metavar="K")
    chk = sub.add_parser("check", help="like up, then measure round trip and throughput, then remove it")
    chk.add_argument("workers", type=int, metavar="K", nargs="?", default=2)
    chk.add_argument("--sizes", type=int, nargs="+", default=[2**16, 2**20, 2**23])
    chk.add_argument("--repeats", type=int, default=5)
    for q in (up, chk):
        q.add_argument(
            "--rate", help="link rate per direction in tc notation (100mbit, 1gbit); default unlimited"
        )
        q.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay d in ms (round trip 2d)")
        q.add_argument("--mtu", type=int, help="default: the largest whose packet takes <= 0.75 ms")
        q.add_argument("--workers-per-block", type=int, metavar="K'", help="two tiers: blocks of K' ranks")
        q.add_argument("--outer-rate", help="two tiers: the uplinks' rate (default unlimited)")
        q.add_argument("--outer-delay-ms", type=float, default=0.0, help="two tiers: the uplinks' d")
        q.add_argument("--prefix", default="lsgd")
    down = sub.add_parser("down", help="remove the namespaces (and end the processes in them)")
    down.add_argument("--prefix", default="lsgd")
    d = sub.add_parser("delayer", help=argparse.SUPPRESS)
    d.add_argument("--delay-ms", type=float, required=True)
    d.add_argument("--queue", type=int, default=QUEUE)
    s = sub.add_parser("serve", help=argparse.SUPPRESS)
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("client", help=argparse.SUPPRESS)
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--repeats", type=int, required=True)
    c.add_argument("--sizes", type=int, nargs="+", required=True)
    args = p.parse_args(argv)

    if args.command == "delayer":
        delayer(args.delay_ms, args.queue)
    elif args.command == "serve":
        _serve(args.port)
    elif args.command == "client":
        _client(args.host, args.port, args.sizes, args.repeats)
    elif args.command == "down":
        names = existing_namespaces(args.prefix)
        remove(names)
        print(f"removed {len(names)} namespaces" + (f": {' '.join(names)}" if names else ""))
    else:
        link = Link(args.rate, args.delay_ms)
        net = Network(args.workers, args.prefix, args.mtu, args.workers_per_block)
        outer = None if args.workers_per_block is None else Link(args.outer_rate, args.outer_delay_ms)
        if args.command == "check":
            with net:
                net.shape(link, outer)
                tiers = "" if outer is None else f", blocks of {args.workers_per_block} joined by {outer}"
                print(f"K={args.workers}, {link}{tiers}, MTU {net.mtu}")
                check(net, args.sizes, args.repeats)
                print(f"packets dropped by the qdiscs: {net.drops()}")
            return 0
        net.up()
        try:
            net.shape(link, outer)
        except BaseException:
            net.down()
            raise
        atexit.unregister(net.down)  # stays up until `down`; the delayers keep running
        addrs = ", ".join(f"{net.namespace(i)}={net.address(i)}" for i in range(args.workers))
        print(f"up: {addrs}; {link}; MTU {net.mtu}; run a rank with `ip netns exec {net.namespace(0)} ...`")
        print(f"remove with: python {Path(__file__).relative_to(ROOT)} down --prefix {args.prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
