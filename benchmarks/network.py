"""Local SGD over an emulated network: K real gloo ranks, one per network namespace, on links of a
given rate and latency (benchmarks/netem.py), against the cost model of ``localsgd.cost_model``.

    python benchmarks/network.py --workers 2 --resume --out benchmarks/results/network.json  # root; 45 min
    python benchmarks/network.py --workers 4 --resume --out benchmarks/results/network.json  # adds K=4
    python benchmarks/network.py --quick                                    # development, 1-2 min

For every K and network it starts K processes with
``ip netns exec NS env RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. GLOO_SOCKET_IFNAME=..
OMP_NUM_THREADS=1 python network.py --worker ...`` (torch.distributed's env:// rendezvous, gloo),
which measure

a. one raw all_reduce of a flat fp32 buffer for a few sizes, and one model average of ResNet-20
   with localsgd's ``FlatAverager`` over a ``DistCommunicator`` (what ``LocalSGD`` runs), each
   after a barrier;
b. training steps of ResNet-20 (or with ``--model gpt`` the sotu-gpt preset's GPT: random 64-byte
   windows, AdamW) (B_loc samples of random CIFAR-sized data, fp32 channels_last,
   SGD with Nesterov momentum) with ``LocalSGD`` for H = 1 (mini-batch SGD), 4, 16, 64, post-local
   SGD (H = 16 from t' = half the steps), and without any averaging (compute only).

Every time is the slowest rank's. Repeats are interleaved (all methods, then again), and the table
shows min/median/max over them. The first network is the unshaped link ("unlimited, d=0"): it
calibrates the model's per-call overhead, the machine's own transfer rate and localsgd's copy
overhead, at the smallest K (see ``scaled()`` for larger K). The model then predicts every other
network from its nominal rate and latency and the compute time measured in the same run, and the
tables show the relative error.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from localsgd import cost_model  # noqa: E402
from localsgd.compression import CODECS  # noqa: E402
from localsgd.harness.planning import CIFAR10_TRAIN_SAMPLES  # noqa: E402

from common import commit, write_result  # noqa: E402
from netem import Link, Network  # noqa: E402

SAMPLES = CIFAR10_TRAIN_SAMPLES
GPT_CONTEXT = 64  # the sotu-gpt preset's seq_len
MODEL_NAMES = {"resnet20": "ResNet-20", "gpt": "the sotu GPT"}
UNSHAPED = Link()
COMPRESSED = {f"{codec} average": codec for codec in CODECS}  # all-reduce rows of compressed averages


# --- inside one rank ---------------------------------------------------------------------------


def _slowest(times: list[float]) -> list[float]:
    """Each repeat's time on the slowest rank."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _every_rank(values: list[float]) -> list[list[float]]:
    """``values`` of every rank, in rank order."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def _model(cfg: dict):
    """The benchmark's model: ResNet-20 (fp32 channels_last), or the sotu-gpt preset's GPT
    (0.83M parameters, 64-byte context)."""
    import torch

    torch.manual_seed(0)
    if cfg.get("model", "resnet20") == "gpt":
        from localsgd.harness.language import build_language_model

        return build_language_model("gpt", {}, GPT_CONTEXT)
    from localsgd.harness.models import build_model

    return build_model("resnet20", 10).to(memory_format=torch.channels_last)


def _task(cfg: dict, model):
    """(inputs, targets, loss function, inner optimizer) of one rank: random CIFAR-sized images
    and SGD with Nesterov momentum for ResNet-20; random byte windows and AdamW (the sotu-gpt
    preset's) for the GPT."""
    import torch
    from torch.nn import functional as F

    from localsgd.harness.optim import sgd

    batch = cfg["local_batch_size"]
    if cfg.get("model", "resnet20") == "gpt":
        x = torch.randint(0, 256, (batch, GPT_CONTEXT))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
        return x, torch.roll(x, -1, 1), lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()), opt
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    opt = sgd(model, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return x, torch.randint(0, 10, (batch,)), F.cross_entropy, opt


def measure_allreduce(cfg: dict) -> list[dict]:
    import torch
    import torch.distributed as dist

    from localsgd import DistCommunicator, FlatAverager, Level
    from localsgd.compression import CompressedMean, make_codec

    params = list(_model(cfg).parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    comm = DistCommunicator(workers_per_block=cfg.get("workers_per_block"))
    if comm.workers_per_block:
        comm.prepare((Level.GLOBAL, Level.BLOCK), collective=True)
    averager = FlatAverager(comm)
    averager.pack_([params])  # as LocalSGD does: the parameters live in the averager's buffers
    methods = []
    for size in [*cfg["sizes"], model_bytes]:
        buf = torch.zeros(size // 4)
        methods.append(("raw all_reduce", size, lambda b=buf: dist.all_reduce(b)))
    methods.append(("localsgd average", model_bytes, lambda: averager.average_(Level.GLOBAL, [params])))
    if comm.workers_per_block:
        methods.append(
            ("localsgd block average", model_bytes, lambda: averager.average_(Level.BLOCK, [params]))
        )
    for codec in cfg.get("compress", []):  # what a compressed global average runs, bytes included
        mean = CompressedMean(make_codec(codec))
        sent = averager.average_(Level.GLOBAL, [params], mean)  # also a warm-up
        methods.append((f"{codec} average", sent,
                        lambda m=mean: averager.average_(Level.GLOBAL, [params], m)))  # fmt: skip
    for _, _, fn in methods:  # warm-up: connections, buffers, TCP windows
        for _ in range(2):
            fn()
    times: list[list[float]] = [[] for _ in methods]
    for _ in range(cfg["ar_repeats"]):
        for i, (_, _, fn) in enumerate(methods):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [
        {"method": name, "bytes": size, "model": name in COMPRESSED or size == model_bytes,
         "workers_per_block": comm.workers_per_block if name == "localsgd block average" else None,
         "seconds": _slowest(t)}
        for (name, size, _), t in zip(methods, times, strict=True)
    ]  # fmt: skip


def schedules(cfg: dict) -> list[tuple[str, dict | None, dict]]:
    """(label, Schedule fields, engine options) of the training runs; None is compute only. The
    options (overlap τ, a codec, an outer optimizer) vary local SGD at H = ``variant_h``."""
    runs: list[tuple[str, dict | None, dict]] = [("compute only", None, {})]
    for h in cfg["local_steps"]:
        runs.append(("mini-batch SGD (H=1)" if h == 1 else f"local SGD H={h}", {"local_steps": h}, {}))
    if cfg["post_local"]:
        h, t_switch = cfg["post_local"], cfg["steps"] // 2
        runs.append((f"post-local H={h}, t'={t_switch}", {"local_steps": h, "switch_step": t_switch}, {}))
    h = {"local_steps": cfg.get("variant_h", 16)}
    for tau in cfg.get("overlap_steps", []):
        runs.append((f"H={h['local_steps']}, overlap τ={tau}", h, {"overlap_steps": tau}))
    for codec in cfg.get("compress", []):
        runs.append((f"H={h['local_steps']}, {codec}", h, {"compression": codec}))
    for outer in cfg.get("outer", []):
        runs.append((f"H={h['local_steps']}, {outer}", h, {"outer_optimizer": outer}))
    for n, tau in cfg.get("fragments", []):  # Streaming DiLoCo's fragments (plain outer step)
        runs.append((f"H={h['local_steps']}, N={n}, τ={tau}", h, {"fragments": n, "overlap_steps": tau}))
    for tau, codec in cfg.get("combined", []):
        runs.append(
            (f"H={h['local_steps']}, τ={tau}, {codec}", h, {"overlap_steps": tau, "compression": codec})
        )
    if cfg.get("hierarchical"):
        h, hb = cfg["hierarchical"]
        runs.append((f"hierarchical H={h}, H_b={hb}", {"local_steps": h, "block_steps": hb}, {}))
    return runs


def engine_options(options: dict) -> dict:
    """LocalSGD keyword arguments of a run's options (outer optimizers by name)."""
    from localsgd import outer

    if "outer_optimizer" in options:
        return {**options, "outer_optimizer": getattr(outer, options["outer_optimizer"])()}
    return options


def measure_training(cfg: dict) -> list[dict]:
    import torch
    import torch.distributed as dist

    from localsgd import DistCommunicator, LocalSGD, Schedule

    torch.manual_seed(1000 + dist.get_rank())
    steps = cfg["steps"]

    def new_comm() -> DistCommunicator:
        return DistCommunicator(workers_per_block=cfg.get("workers_per_block"))

    traces: list[list[list[float]]] = []  # compute only: per repeat, per rank, every step's seconds
    # every run: per repeat, per rank, every step's zero_grad + forward + backward seconds
    backward: dict[str, list[list[list[float]]]] = {}

    def run(label: str, fields: dict | None, options: dict, n: int) -> tuple[float, float, int]:
        model = _model(cfg)
        x, y, loss, opt = _task(cfg, model)
        engine = (
            opt
            if fields is None
            else LocalSGD(opt, model, Schedule(**fields), comm=new_comm(), **engine_options(options))
        )
        dist.barrier()
        start = time.perf_counter()
        ends, mids = [], []
        peak = 0  # the most bytes one step sent (one sync: a fragment's, or the whole model's)
        for _ in range(n):
            engine.zero_grad()
            loss(model(x), y).backward()
            mids.append(time.perf_counter())
            sent = 0 if fields is None else engine.stats["global"].bytes
            engine.step()
            ends.append(time.perf_counter())
            if fields is not None:
                peak = max(peak, engine.stats["global"].bytes - sent)
        if fields is not None and n:
            engine.flush()  # an overlapped average still in flight belongs to this run
            ends[-1] = time.perf_counter()
        elapsed = ends[-1] - start if ends else 0.0
        if n == steps:
            fb = [round(m - a, 6) for a, m in zip([start, *ends], mids, strict=False)]
            backward.setdefault(label, []).append(_every_rank(fb))
            if fields is None:
                traces.append(_every_rank([b - a for a, b in zip([start, *ends], ends, strict=False)]))
        if fields is None:
            return elapsed, 0.0, 0, 0
        stats = engine.stats["global"]
        return elapsed, stats.seconds, stats.rounds, peak

    run("warm-up", None, {}, 3)  # allocator, oneDNN primitives
    runs = schedules(cfg)
    results: list[list[tuple[float, float, int, int]]] = [[] for _ in runs]
    for rep in range(cfg["repeats"]):
        for i, (label, fields, options) in enumerate(runs):
            results[i].append(run(label, fields, options, steps))
            if dist.get_rank() == 0:
                print(f"    repeat {rep + 1}/{cfg['repeats']}: {label}", file=sys.stderr, flush=True)
    rows = []
    for (label, fields, options), res in zip(runs, results, strict=True):
        elapsed = _slowest([r[0] for r in res])
        comm = _slowest([r[1] for r in res])
        rows.append(
            {
                "schedule": label,
                "fields": fields,
                "options": options,
                "steps": steps,
                "seconds_per_step": [e / steps for e in elapsed],
                "comm_seconds_per_step": [c / steps for c in comm],
                "averages": res[0][2],
                "bytes_per_sync_max": res[0][3],
                "forward_backward_seconds_per_rank": backward[label],
            }
        )
    rows[0]["step_seconds_per_rank"] = traces  # the compute-only row: ranks' step-time jitter
    return rows


def worker(cfg_path: Path, out: Path) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    cfg = json.loads(cfg_path.read_text())
    dist.init_process_group("gloo", timeout=timedelta(minutes=15))
    result = {"allreduce": measure_allreduce(cfg)}
    result["training"] = measure_training(cfg) if cfg["train"] else []
    if dist.get_rank() == 0:
        out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip gloo's C++ teardown


# --- the driver ---------------------------------------------------------------------------------


def launch(net: Network, cfg: dict, port: int, tmp: Path) -> dict:
    """Run the K ranks in their namespaces; return rank 0's results. Any failure ends all ranks."""
    cfg_path, out = tmp / "cfg.json", tmp / "out.json"
    cfg_path.write_text(json.dumps(cfg))
    out.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_", "TORCHELASTIC", "GROUP_"))}
    procs = []
    try:
        for i in range(net.workers):
            cmd = [*net.exec(i), "env", f"RANK={i}", f"WORLD_SIZE={net.workers}",
                   f"MASTER_ADDR={net.address(0)}", f"MASTER_PORT={port}",
                   f"GLOO_SOCKET_IFNAME={net.interface(i)}", "OMP_NUM_THREADS=1",
                   "TORCH_CPP_LOG_LEVEL=ERROR", f"PYTHONPATH={ROOT}",
                   sys.executable, __file__, "--worker", str(cfg_path), str(out)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                raise RuntimeError(f"rank {failed[0]} failed with exit code {procs[failed[0]].returncode}")
            if not net.delayers_alive():
                raise RuntimeError("a delayer process died; the latency is no longer emulated")
            time.sleep(0.2)
        if any(p.returncode for p in procs):
            raise RuntimeError(f"ranks failed with exit codes {[p.returncode for p in procs]}")
        return json.loads(out.read_text())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def calibrate(allreduce: list[dict], workers: int) -> dict:
    """From the unshaped link: the fixed cost of one all_reduce call (intercept), the machine's
    own transfer rate (slope, over the ring's bytes per worker) and localsgd's copy overhead. Uses
    the fastest repeat of each: the software's cost without the scheduler's hiccups."""
    raw = [r for r in allreduce if r["method"] == "raw all_reduce"]
    xs = [2 * (workers - 1) / workers * r["bytes"] for r in raw]
    ys = [min(r["seconds"]) for r in raw]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    model_raw = next(min(r["seconds"]) for r in raw if r["model"])
    average = next(min(r["seconds"]) for r in allreduce if r["method"] == "localsgd average")
    cal = {
        "overhead": max(0.0, intercept),
        "host_bandwidth": 1 / slope if slope > 0 else math.inf,
        "average_overhead": max(0.0, average - model_raw),
        "codec_overhead": {},
    }
    # a compressed average beyond its two collectives on this link: encoding and decoding
    net = cost_model.Network(0.0, cal["host_bandwidth"], cal["overhead"])
    for r in allreduce:
        if r["method"] in COMPRESSED:
            wire = cost_model.compressed_mean_seconds(r["bytes"], workers, net)
            cal["codec_overhead"][COMPRESSED[r["method"]]] = max(0.0, min(r["seconds"]) - wire)
    return cal


def scaled(cal: dict, calibrated_at: int, workers: int) -> dict:
    """The software costs measured at K0 = ``calibrated_at`` ranks, for K = ``workers``.

    With more ranks than CPUs the unshaped link is CPU-bound, and its calibration would overstate
    them, so they are measured at the smallest K. They are CPU work every rank does at the same
    time, which takes max(1, K / CPUs) times as long when the K ranks share the machine's CPUs.
    """
    cpus = os.cpu_count() or 1
    factor = max(1.0, workers / cpus) / max(1.0, calibrated_at / cpus)
    codecs = {c: factor * v for c, v in cal.get("codec_overhead", {}).items()}
    return {**cal, "overhead": factor * cal["overhead"], "average_overhead": factor * cal["average_overhead"],
            "codec_overhead": codecs}  # fmt: skip


def model_network(link: Link, cal: dict) -> cost_model.Network:
    rate = math.inf if link.rate is None else cost_model.parse_rate(link.rate)
    return cost_model.Network(link.delay_ms / 1e3, min(rate, cal["host_bandwidth"]), cal["overhead"])


def waited_compute(traces: list[list[list[float]]], h: int, start: int = 0, stop: int | None = None) -> float:
    """Compute seconds per step when K ranks wait for each other every ``h`` steps: the mean over
    h-step windows (of steps ``start:stop``) of the slowest rank's time for the window, over h.
    From the compute-only run's per-rank step times; equal to the plain mean without jitter."""
    per_step = []
    for ranks in traces:
        end = len(ranks[0]) if stop is None else stop
        for i in range(start, end - h + 1, h):
            per_step.append(max(sum(steps[i : i + h]) for steps in ranks) / h)
    return statistics.fmean(per_step)


def predict_rows(entry: dict, cal: dict, cfg: dict) -> None:
    """Add the model's prediction and relative error to every measured row of one (K, network)."""
    k, link = entry["workers"], Link(entry["rate"], entry["delay_ms"])
    net = model_network(link, cal)
    for r in entry["allreduce"]:
        pred = cost_model.allreduce_seconds(r["bytes"], k, net)
        if r["method"] == "localsgd average":
            pred += cal["average_overhead"]
        if r["method"] == "localsgd block average":  # inside a block: the unshaped inner links
            inner = model_network(UNSHAPED, cal)
            pred = cost_model.allreduce_seconds(r["bytes"], r["workers_per_block"], inner)
            pred += cal["average_overhead"]
        if r["method"] in COMPRESSED:
            codec = COMPRESSED[r["method"]]
            pred = cost_model.compressed_mean_seconds(r["bytes"], k, net) + cal["codec_overhead"][codec]
        r["model_seconds"] = pred
        r["error"] = pred / _med(r["seconds"]) - 1
    if not entry["training"]:
        return
    rows = {r["schedule"]: r for r in entry["training"]}
    compute = _med(rows["compute only"]["seconds_per_step"])
    model_bytes = next(
        r["bytes"] for r in entry["allreduce"] if r["model"] and r["method"] == "raw all_reduce"
    )
    steps = cfg["steps"]
    preds = cost_model.predict(compute, model_bytes, k, net, steps_per_epoch=steps,
                               local_steps=cfg["local_steps"], post_local=cfg["post_local"] or None,
                               switch_epoch=(steps // 2) / steps, epochs=1,
                               average_overhead=cal["average_overhead"])  # fmt: skip
    by_h = {p.local_steps: p for p in preds if p.switch_epochs == 0}
    n = cost_model.steps_per_epoch(SAMPLES, k, cfg["local_batch_size"])
    minibatch = _med(rows["mini-batch SGD (H=1)"]["seconds_per_step"]) if 1 in cfg["local_steps"] else None
    for r in entry["training"]:
        fields, options = r["fields"], r.get("options", {})
        if fields is None:
            p = by_h[None]
        elif options.get("overlap_steps") or options.get("compression") or options.get("fragments"):
            codec = options.get("compression")
            p = cost_model.predict(compute, model_bytes, k, net, steps_per_epoch=steps,
                                   local_steps=[fields["local_steps"]],
                                   average_overhead=cal["average_overhead"], compression=codec,
                                   codec_overhead=cal["codec_overhead"].get(codec, 0.0),
                                   overlap_steps=options.get("overlap_steps", 0),
                                   fragments=options.get("fragments", 1))[0]  # fmt: skip
            r["model_bytes_per_sync"] = p.bytes_per_sync
        elif fields.get("block_steps"):
            seconds = cost_model.hierarchical_seconds_per_step(
                compute, model_bytes, k, entry["workers_per_block"], model_network(UNSHAPED, cal), net,
                fields["local_steps"], fields["block_steps"], cal["average_overhead"],
            )  # fmt: skip
            minibatch_step = preds[0].speedup * preds[0].seconds_per_step
            p = SimpleNamespace(seconds_per_step=seconds, speedup=minibatch_step / seconds)
        elif fields.get("switch_step"):
            p = next(p for p in preds if p.switch_epochs > 0)
        else:
            p = by_h[fields["local_steps"]]
        med = _med(r["seconds_per_step"])
        r["epoch_seconds"] = n * med
        if "forward_backward_seconds_per_rank" in r:  # per repeat: mean over ranks and steps
            traces = r["forward_backward_seconds_per_rank"]
            r["forward_backward_seconds_per_step"] = [statistics.fmean(itertools.chain(*t)) for t in traces]
        r["model_seconds_per_step"] = p.seconds_per_step
        r["error"] = p.seconds_per_step / med - 1
        # The same model from the fastest compute-only repeat, against the fastest repeat: this VM's
        # noise only ever adds time (other guests on the host), so minima are the least disturbed.
        fastest = min(rows["compute only"]["seconds_per_step"])
        r["model_seconds_per_step_min"] = p.seconds_per_step - compute + fastest
        r["error_min"] = r["model_seconds_per_step_min"] / min(r["seconds_per_step"]) - 1
        traces = rows["compute only"].get("step_seconds_per_rank")
        if traces and fields is not None:  # the same model, its compute term with the ranks' jitter
            h, t_switch = fields["local_steps"], fields.get("switch_step", 0)
            waited = (t_switch * waited_compute(traces, 1, 0, t_switch) if t_switch else 0.0) + (
                steps - t_switch
            ) * waited_compute(traces, h, t_switch)
            r["model_waiting_seconds_per_step"] = p.seconds_per_step - compute + waited / steps
            r["error_waiting"] = r["model_waiting_seconds_per_step"] / med - 1
        if minibatch is not None:
            r["speedup"] = minibatch / med
            r["model_speedup"] = p.speedup
            r["speedup_error"] = p.speedup / r["speedup"] - 1


def _row(cells: list[tuple[object, str]]) -> str:
    return " ".join(format(value, spec) for value, spec in cells)


def print_tables(entries: list[dict], model: str = "resnet20") -> None:
    print("One all-reduce / model average, ms (slowest rank; min/median/max over repeats) and the cost model")
    head = ["K", "network", "what", "bytes", "min", "median", "max", "model", "error"]
    widths = [">2", "<22", "<30", ">9", ">8", ">8", ">8", ">8", ">7"]
    specs = [*widths[:4], ">8.2f", ">8.2f", ">8.2f", ">8.2f", ">+7.1%"]
    print(_row(list(zip(head, widths, strict=True))))
    for e in entries:
        for r in e["allreduce"]:
            ms = [1e3 * s for s in r["seconds"]]
            what = r["method"] + " (model)" * bool(r["model"])
            values = [e["workers"], e["network"], what, r["bytes"], min(ms), _med(ms), max(ms)]
            values += [1e3 * r["model_seconds"], r["error"]]
            print(_row(list(zip(values, specs, strict=True))))
    trained = [e for e in entries if e["training"]]
    if not trained:
        return
    print()
    print(
        f"Training {MODEL_NAMES[model]} with LocalSGD: ms per step (slowest rank; min/median/max), "
        "ms per step spent"
    )
    print("averaging, ms per step in zero_grad + forward + backward (f+b: mean over ranks, median over")
    print("repeats), projected s per CIFAR-10 epoch, speed-up over H=1; the cost model's ms per step and")
    print("speed-up (from the compute-only time of the same run), and their relative errors; m+wait: the")
    print("same model with the compute term the ranks' measured step-time jitter implies when they wait")
    print("for each other every H steps (see waited_compute); min err: the model from the fastest")
    print("compute-only repeat against the fastest repeat")
    head = [
        "K",
        "network",
        "schedule",
        "min",
        "median",
        "max",
        "comm",
        "f+b",
        "MB/sync",
        "s/epoch",
        "speedup",
        "model",
        "error",
    ]
    head += ["model su", "error", "m+wait", "error", "min err"]
    widths = [">2", "<22", "<24", *[">7"] * 3, ">6", ">6", ">7", ">8", *[">7"] * 3, ">8", *[">7"] * 4]
    specs = [*widths[:3], ">7.1f", ">7.1f", ">7.1f", ">6.1f", ">6.1f", ">7.3f", ">8.1f", ">7.2f", ">7.1f"]
    specs += [">+7.1%", ">8.2f", ">+7.1%", ">7.1f", ">+7.1%", ">+7.1%"]
    print(_row(list(zip(head, widths, strict=True))))
    for e in trained:
        for r in e["training"]:
            ms = [1e3 * s for s in r["seconds_per_step"]]
            values = [e["workers"], e["network"], r["schedule"], min(ms), _med(ms), max(ms)]
            fb = 1e3 * _med(r.get("forward_backward_seconds_per_step", [math.nan]))
            values += [
                1e3 * _med(r["comm_seconds_per_step"]),
                fb,
                r.get("bytes_per_sync_max", math.nan) / 1e6,
            ]
            values += [r["epoch_seconds"]]
            if "speedup" in r:
                values += [r["speedup"], 1e3 * r["model_seconds_per_step"], r["error"]]
                values += [r["model_speedup"], r["speedup_error"]]
            if "error_waiting" in r:
                values += [1e3 * r["model_waiting_seconds_per_step"], r["error_waiting"], r["error_min"]]
            print(_row(list(zip(values, specs[: len(values)], strict=True))))


def plot(entries: list[dict], local_batch_size: int, out: Path, model: str = "resnet20") -> Path:
    """Seconds per CIFAR-10 epoch (ResNet-20) or milliseconds per step (the GPT) per schedule,
    measured (bars: median, whiskers: min-max) and predicted by the cost model (dots), one panel
    per K and shaped network."""
    from localsgd.harness.plot import pyplot, save

    plt = pyplot()
    trained = [e for e in entries if e["training"]]
    ks = sorted({e["workers"] for e in trained})
    nets = list(dict.fromkeys(e["network"] for e in trained))
    fig, axes = plt.subplots(len(ks), len(nets), figsize=(3.2 * len(nets), 3.2 * len(ks)), squeeze=False)
    for e in trained:
        ax = axes[ks.index(e["workers"]), nets.index(e["network"])]
        rows = [r for r in e["training"] if r["schedule"] != "compute only"]
        epochs = model == "resnet20"
        n = cost_model.steps_per_epoch(SAMPLES, e["workers"], local_batch_size) if epochs else 1000
        med = [n * _med(r["seconds_per_step"]) for r in rows]
        lo = [m - n * min(r["seconds_per_step"]) for m, r in zip(med, rows, strict=True)]
        hi = [n * max(r["seconds_per_step"]) - m for m, r in zip(med, rows, strict=True)]
        xs = range(len(rows))
        ax.bar(xs, med, yerr=[lo, hi], color="tab:blue", alpha=0.6, capsize=3, label="measured (median)")
        ax.plot(xs, [n * r["model_seconds_per_step"] for r in rows], "ko", ms=4, label="cost model")
        if all("model_waiting_seconds_per_step" in r for r in rows):
            waiting = [n * r["model_waiting_seconds_per_step"] for r in rows]
            ax.plot(xs, waiting, "rx", ms=6, label="cost model + ranks' jitter")
        compute = next(r for r in e["training"] if r["schedule"] == "compute only")
        ax.axhline(n * _med(compute["seconds_per_step"]), color="gray", ls="--", lw=1, label="compute only")
        labels = [
            r["schedule"].replace("mini-batch SGD (H=1)", "H=1").replace("local SGD ", "") for r in rows
        ]
        ax.set_xticks(list(xs), [lb.split(", t'")[0] for lb in labels], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"K={e['workers']}, {e['network']}", fontsize=9)
        ax.set_ylabel("s per CIFAR-10 epoch" if epochs else "ms per step")
    return save(fig, axes, axes[0, 0], out)


def summary(entries: list[dict]) -> dict:
    """Largest relative errors of the model on the shaped networks (the calibration link excluded)."""
    shaped = [e for e in entries if e["rate"] is not None or e["delay_ms"] > 0]
    err = {
        "allreduce_model_size": [abs(r["error"]) for e in shaped for r in e["allreduce"] if r["model"]],
        "allreduce_all_sizes": [abs(r["error"]) for e in shaped for r in e["allreduce"]],
        # rows that are not the model's input (compute only) or its reference (H = 1, speed-up 1)
        "step_time": [abs(r["error"]) for e in shaped for r in e["training"] if "error" in r and r["fields"]],
        "step_time_fastest_repeats": [
            abs(r["error_min"]) for e in shaped for r in e["training"] if "error_min" in r and r["fields"]
        ],
        "step_time_with_waiting": [
            abs(r["error_waiting"]) for e in shaped for r in e["training"] if "error_waiting" in r
        ],
        "speedup": [
            abs(r["speedup_error"])
            for e in shaped
            for r in e["training"]
            if "speedup_error" in r and r["fields"] and r["fields"] != {"local_steps": 1}
        ],
    }
    return {k: {"max": max(v), "median": _med(v)} for k, v in err.items() if v}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4], metavar="K")
    p.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"], help="link rates (tc notation)")
    p.add_argument("--delays-ms", type=float, nargs="+", default=[1.0, 5.0], help="one-way delays d")
    p.add_argument("--sizes", type=int, nargs="+", default=[2**16, 2**20, 2**22], help="all_reduce bytes")
    p.add_argument("--ar-repeats", type=int, default=11, help="repeats of each all_reduce")
    p.add_argument(
        "--model", choices=("resnet20", "gpt"), default="resnet20", help="gpt: the sotu-gpt preset's"
    )
    p.add_argument("--local-batch-size", type=int, default=32)
    p.add_argument("--local-steps", type=int, nargs="+", default=[1, 4, 16, 64], metavar="H")
    p.add_argument("--post-local", type=int, default=16, metavar="H", help="H after t' (0: none)")
    p.add_argument(
        "--overlap-steps",
        type=int,
        nargs="+",
        default=[],
        metavar="TAU",
        help="also local SGD at --variant-h with overlapped averages, applied TAU steps later",
    )
    p.add_argument(
        "--compress",
        nargs="+",
        default=[],
        choices=CODECS,
        help="also compressed averages: their cost, and local SGD at --variant-h with them",
    )
    p.add_argument(
        "--combine",
        action="store_true",
        help="also every --overlap-steps TAU with every --compress CODEC in one run",
    )
    p.add_argument(
        "--outer",
        nargs="+",
        default=[],
        choices=["diloco", "slowmo"],
        help="also local SGD at --variant-h with this outer optimizer",
    )
    p.add_argument(
        "--workers-per-block",
        type=int,
        metavar="K'",
        help="two tiers: blocks of K' ranks on unshaped links, the rates and delays between blocks",
    )
    p.add_argument(
        "--hierarchical",
        type=int,
        nargs=2,
        metavar=("H", "H_B"),
        help="also hierarchical local SGD (needs --workers-per-block; default 4 4 with it)",
    )
    p.add_argument(
        "--fragments",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also Streaming DiLoCo at --variant-h: N fragments, with τ = 0 and every --overlap-steps TAU",
    )
    p.add_argument("--variant-h", type=int, default=16, metavar="H", help="H of those runs (default 16)")
    p.add_argument("--steps", type=int, default=192, help="steps per training run (a multiple of every H)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each training run")
    p.add_argument("--no-train", action="store_true", help="all-reduce measurements only")
    p.add_argument("--quick", action="store_true", help="development: K=2, one network, short runs")
    p.add_argument("--mtu", type=int, help="fixed MTU (default: per link, see netem.py)")
    p.add_argument("--prefix", default="lsgd", help="namespace name prefix")
    p.add_argument("--out", help="write JSON here (default: none)")
    p.add_argument("--resume", action="store_true", help="keep the networks already in --out, run the rest")
    p.add_argument("--plot", help="write a PNG of the training results here")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return
    if args.quick:
        args.workers, args.rates, args.delays_ms = [2], ["100mbit"], [1.0]
        args.sizes, args.ar_repeats, args.steps, args.repeats = [2**16, 2**20], 5, 32, 1
        args.local_steps = [1, 4, 16]
    if 1 not in args.local_steps:
        p.error("--local-steps must include 1 (mini-batch SGD, the speed-up baseline)")
    bad = [h for h in args.local_steps if args.steps % h]
    h = args.variant_h
    if any(h % n or any(h // n <= tau for tau in args.overlap_steps) for n in args.fragments):
        p.error(f"--fragments {args.fragments}: every N must divide H = {h}, every TAU be < H/N")
    if args.overlap_steps or args.compress or args.outer or args.fragments:
        bad += [args.variant_h] if args.steps % args.variant_h else []
        if any(not 1 <= tau < args.variant_h for tau in args.overlap_steps):
            p.error(
                f"--overlap-steps {args.overlap_steps}: every TAU must be in 1..H-1 for H = {args.variant_h}"
            )
    if args.post_local and (args.steps - args.steps // 2) % args.post_local:
        bad.append(args.post_local)
    if bad:
        p.error(f"--steps {args.steps}: every H (and steps/2 for --post-local) must divide it, not H={bad}")
    for rate in args.rates:
        cost_model.parse_rate(rate)
    cfg = {
        "sizes": args.sizes, "ar_repeats": args.ar_repeats, "local_batch_size": args.local_batch_size,
        "local_steps": args.local_steps, "post_local": args.post_local, "steps": args.steps,
        "repeats": args.repeats, "model": args.model,
    }  # fmt: skip
    if args.workers_per_block is not None:
        kb = args.workers_per_block
        if any(k % kb or k == kb for k in args.workers):
            p.error(f"--workers-per-block {kb} must divide every K and be less, got K = {args.workers}")
        cfg.update(workers_per_block=args.workers_per_block, hierarchical=args.hierarchical or [4, 4])
    elif args.hierarchical:
        p.error("--hierarchical needs --workers-per-block (the block size K')")
    variants = {"overlap_steps": args.overlap_steps, "compress": args.compress, "outer": args.outer}
    if args.fragments:
        variants["fragments"] = [[n, tau] for n in args.fragments for tau in [0, *args.overlap_steps]]
    if any(variants.values()):  # (only then: a file measured without them resumes as before)
        cfg.update(variants, variant_h=args.variant_h)
        if args.combine:
            cfg["combined"] = [[tau, codec] for tau in args.overlap_steps for codec in args.compress]
    links = [UNSHAPED] + [Link(r, d) for r in args.rates for d in args.delays_ms]
    entries: list[dict] = []
    started = time.time()
    port = 29500
    calibrations: dict[int, dict] = {}
    if args.out and Path(args.out).is_file() and not args.resume:
        p.error(f"{args.out} exists: pass --resume to continue it, or remove it to measure again")
    if args.resume:
        if not args.out:
            p.error("--resume needs --out (the results to continue)")
        if Path(args.out).is_file():
            done = json.loads(Path(args.out).read_text())
            if done["settings"] != settings(cfg, args):
                p.error(f"--resume: {args.out} was measured with other settings: {done['settings']}")
            entries = done["entries"]
            calibrations = {int(k): v for k, v in done["calibrations"].items()}
    kb = args.workers_per_block

    def label(k: int, link: Link) -> str:
        return str(link) if kb is None else f"{k // kb}x{kb}, {link}"

    measured = {(e["workers"], e["network"]) for e in entries}
    with tempfile.TemporaryDirectory() as tmp:
        for k in sorted(args.workers):
            todo = [link for link in links if (k, label(k, link)) not in measured]
            if not todo:
                continue
            with Network(k, args.prefix, args.mtu, kb) as net:
                for link in todo:
                    net.shape(UNSHAPED, link) if kb else net.shape(link)
                    train = not args.no_train and link != UNSHAPED
                    note = "" if train else " (all-reduce only)"
                    print(f"K={k}, {link}, MTU {net.mtu}{note} ...", file=sys.stderr, flush=True)
                    port += 1
                    res = launch(net, {**cfg, "train": train}, port, Path(tmp))
                    entry = {
                        "workers": k,
                        "network": label(k, link),
                        "rate": link.rate,
                        "delay_ms": link.delay_ms,
                    }
                    entry["workers_per_block"] = kb  # two tiers: K' per block, link is between blocks
                    entry["commit"] = commit()  # a resumed run may span several versions of the code
                    entry.update(mtu=net.mtu, qdisc_drops=net.drops(), **res)
                    if entry["qdisc_drops"]:
                        print(f"  warning: the link dropped {entry['qdisc_drops']} packets", file=sys.stderr)
                    if k not in calibrations:  # the first link is the unshaped one
                        calibrations[k] = calibrate(entry["allreduce"], k)
                    base = min(calibrations)  # the smallest K measured (see scaled())
                    entry["calibration"] = scaled(calibrations[base], base, k)
                    entry["calibrated_at"] = base
                    predict_rows(entry, entry["calibration"], cfg)
                    entries.append(entry)
                    if args.out:  # after every network, so that a failure later loses nothing
                        write_json(Path(args.out), cfg, args, entries, calibrations)
    entries.sort(
        key=lambda e: (e["workers"], [label(e["workers"], link) for link in links].index(e["network"]))
    )
    for e in entries:  # the current model on every measurement, also those of an earlier sitting
        predict_rows(e, e["calibration"], cfg)
    if args.out and entries:
        write_json(Path(args.out), cfg, args, entries, calibrations)
    print_tables(entries, cfg["model"])
    if args.plot:
        print(f"wrote {plot(entries, args.local_batch_size, Path(args.plot), cfg['model'])}", file=sys.stderr)
    print()
    for k, cal in sorted(calibrations.items()):
        used = " (used, scaled by max(1, K/CPUs))" if k == min(calibrations) else " (not used)"
        print(f"calibration K={k}{used}: overhead {1e3 * cal['overhead']:.2f} ms per all_reduce, "
              f"host rate {cal['host_bandwidth'] * 8 / 1e9:.2f} Gbit/s, "
              f"localsgd copy overhead {1e3 * cal['average_overhead']:.2f} ms per average")  # fmt: skip
    for what, e in summary(entries).items():
        print(f"model error on shaped links, {what}: median {e['median']:.1%}, max {e['max']:.1%}")
    print(f"took {(time.time() - started) / 60:.1f} min", file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)


def settings(cfg: dict, args: argparse.Namespace) -> dict:
    """What every network of one results file must share (K may differ: --workers 2, later
    --workers 4 --resume)."""
    return {
        **cfg,
        "rates": args.rates,
        "delays_ms": args.delays_ms,
        "mtu": args.mtu,
        "train_samples": SAMPLES,
    }


def write_json(
    path: Path, cfg: dict, args: argparse.Namespace, entries: list[dict], calibrations: dict[int, dict]
) -> None:
    result = {
        "settings": settings(cfg, args),
        "workers": sorted({e["workers"] for e in entries}),
        "calibrations": calibrations,
        "entries": entries,
        "model_errors": summary(entries),
    }
    write_result(path, result)


if __name__ == "__main__":
    main()
