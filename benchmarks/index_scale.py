"""Start-up at scale: the image index built once and memory-mapped, against ``json.load``, 1k to 1M+ images.

Synthetic COCO datasets of N images are made of hard links to the real photos in ``../shared`` (their own
annotations: ~9.5 boxes per image, the same sizes), each image under ``images/NNNNN/`` (1,000 per folder).
Per N, every figure comes from a fresh process (so peaks do not mix), in one run:

* ``json.load``: the standard library's parse of the same file (wall s, peak RSS): the yardstick.
* ``first build``: ``ObjCropLoader(json, boxes=<.boxes>, mode="obj-obj-dilate", device="cpu")`` with no
  index yet (the streaming read, the parallel header scan, the save): constructor s, peak RSS (the
  process; the scan workers' own peak apart), s to the first batch, RSS after it.
* ``cached``: the same with the index built: constructor and first-batch s, peak RSS, RSS/PSS after the
  first batch.
* ``8 ranks``: eight processes (``rank=r, world_size=8``) started together, cached and first build (one
  builds under the lock, seven wait); all stay alive until each has its first batch, then their PSS
  (shared pages split between the processes that map them) is summed.
* ``added`` memory: a figure minus the same figure for the 1,000-image set (DALI, torch and the pipeline
  cost the same there), so it is what the dataset adds.

Usage::

    .venv/bin/python benchmarks/index_scale.py                      # 1k, 10k, 100k, 1M
    .venv/bin/python benchmarks/index_scale.py --sizes 1000,10000   # quick
    .venv/bin/python benchmarks/index_scale.py --sizes 1000,2000000 --no-json-load   # json.load needs >12 GB at 2M

The synthetic sets live under ``--workdir`` (default a temporary folder, deleted at the end unless
``--keep``).  Every child is killed if the memory (PSS) of the measured process trees passes ``--max-gb`` (default 9), and
Ctrl-C stops the children and deletes the sets.  Results: ``benchmarks/results/index_scale.json`` and
``.png``; docs/image_index.md holds the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco_val2017_subset"
PER_DIR = 1000


# ---------------------------------------------------------------------------------------------------
# the synthetic sets
# ---------------------------------------------------------------------------------------------------
def make_dataset(out: Path, n: int, coco: Path = COCO) -> Path:
    """A COCO json of ``n`` images (hard links to the real photos, their own boxes), written streaming."""
    ann = out / "annotations.json"
    if ann.exists():
        return ann
    d = json.loads((coco / "annotations" / "instances.json").read_text())
    ims, by = d["images"], {}
    for a in d["annotations"]:
        by.setdefault(a["image_id"], []).append(a)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tmp = out / "annotations.json.tmp"
    aid = 1
    with open(tmp, "w") as f:
        f.write('{"info": {"description": "synthetic: hard links to ../shared COCO photos"}, "images": [')
        for i in range(n):
            src = ims[i % len(ims)]
            sub = f"{i // PER_DIR:05d}"
            if i % PER_DIR == 0:
                (out / "images" / sub).mkdir(exist_ok=True)
            name = f"{sub}/{i:09d}.jpg"
            dst = out / "images" / name
            if not dst.exists():
                os.link(coco / "images" / src["file_name"], dst)
            f.write(("" if i == 0 else ", ") + json.dumps({"id": i + 1, "file_name": name, "width": src["width"],
                                                           "height": src["height"]}))
        f.write('], "annotations": [')
        first = True
        for i in range(n):
            for a in by.get(ims[i % len(ims)]["id"], []):
                f.write(("" if first else ", ") + json.dumps(dict(a, id=aid, image_id=i + 1)))
                aid += 1
                first = False
        f.write('], "categories": ' + json.dumps(d["categories"]) + "}")
    tmp.rename(ann)
    return ann


# ---------------------------------------------------------------------------------------------------
# measurements in child processes
# ---------------------------------------------------------------------------------------------------
def _mem() -> dict:
    """This process's memory now (GB): RSS, PSS and private (USS) from /proc, and its peak RSS."""
    import resource
    out = {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    try:
        with open("/proc/self/smaps_rollup") as f:
            kv = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.split()[-1] == "kB"}
        out["rss_gb"] = kv["Rss"] / 2**20
        out["pss_gb"] = kv["Pss"] / 2**20
        out["uss_gb"] = (kv.get("Private_Clean", 0) + kv.get("Private_Dirty", 0)) / 2**20
    except OSError:
        pass
    return out


def child(spec: dict) -> dict:
    """One measurement (``spec["what"]``): ``json_load``, ``store`` or ``loader``."""
    if spec["what"] == "json_load":
        t = time.perf_counter()
        with open(spec["json"]) as f:
            d = json.load(f)
        dt = time.perf_counter() - t
        return {"seconds": dt, "images": len(d["images"]), "annotations": len(d["annotations"]), **_mem()}
    if spec["what"] == "index":       # the build alone (what `dali-objcrop index` runs), no torch or DALI
        import resource
        from dali_objcrop import index as m
        path = m.index_path(spec["json"])
        t = time.perf_counter()
        m._build_and_save(spec["json"], None, True, False, None, False, str(path))
        dt = time.perf_counter() - t
        return {"seconds": dt, **_mem(),
                "workers_peak_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}
    if spec["what"] == "store":
        from dali_objcrop.boxstore import BoxStore
        t = time.perf_counter()
        BoxStore.from_coco(spec["json"]).save(spec["store"])
        return {"seconds": time.perf_counter() - t, **_mem()}
    import resource
    import torch
    torch.set_num_threads(1)
    from dali_objcrop import ObjCropLoader, plugin
    plugin.load()
    before = _mem()
    t0 = time.perf_counter()
    ld = ObjCropLoader(spec["json"], boxes=spec["store"], mode="obj-obj-dilate", device="cpu",
                       rank=spec.get("rank", 0), world_size=spec.get("world_size", 1), num_threads=2)
    t1 = time.perf_counter()
    at_ctor = _mem()
    batch = next(iter(ld))
    t2 = time.perf_counter()
    after = _mem()
    res = {"constructor_s": t1 - t0, "first_batch_s": t2 - t0, "batch": int(len(batch["index"])),
           "images": len(ld.index), "before": before, "after_constructor": at_ctor, "after_first_batch": after,
           "children_peak_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
           "pipeline": ld.stats.get("pipeline"), "index_file": str(getattr(ld.index, "path", ""))}
    if spec.get("hold"):     # eight ranks: stay alive (mapped) until the parent has read every rank's memory
        print(json.dumps(res), flush=True)
        sys.stdin.readline()
        return {}
    return res


def _tree_pss_gb(pid: int) -> float:
    """Memory of a process and its descendants (GB): PSS from /proc (shared pages split between the
    processes that map them, so eight ranks mapping one file count it once)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next((int(ln.split()[1]) for ln in f if ln.startswith("Pss:")), 0)
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return total / 2**20


class Runner:
    """Children under a memory watch: killed past ``max_gb`` (all of them together)."""

    def __init__(self, max_gb: float, env: dict) -> None:
        self.max_gb, self.env, self.live = max_gb, env, []

    def start(self, spec: dict) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
                             start_new_session=True)
        self.live.append(p)
        return p

    def watch(self, procs: list[subprocess.Popen], until) -> None:
        peak = 0.0
        while not until():
            gb = sum(_tree_pss_gb(p.pid) for p in procs if p.poll() is None)
            peak = max(peak, gb)
            if gb > self.max_gb:
                self.kill_all()
                raise SystemExit(f"stopped: the measured processes held {gb:.1f} GB (> --max-gb {self.max_gb})")
            time.sleep(0.2)
        self.tree_peak = peak

    def run(self, spec: dict, timeout: float = 3600) -> dict:
        p = self.start(spec)
        t = time.time()
        self.watch([p], lambda: p.poll() is not None or time.time() - t > timeout)
        out, err = p.communicate()
        self.live.remove(p)
        if p.returncode != 0:
            raise RuntimeError(f"child {spec['what']} failed ({p.returncode}): {err[-3000:]}")
        res = json.loads(out.strip().splitlines()[-1])
        res["tree_peak_gb"] = self.tree_peak
        return res

    def ranks(self, spec: dict, n: int) -> dict:
        """``n`` loader processes started together; their memory is read while all are alive."""
        t0 = time.perf_counter()
        procs = [self.start(dict(spec, rank=r, world_size=n, hold=True)) for r in range(n)]
        lines: list = [None] * n
        import threading

        def read(i: int) -> None:
            lines[i] = procs[i].stdout.readline()
        th = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(n)]
        for x in th:
            x.start()
        self.watch(procs, lambda: all(not x.is_alive() for x in th) or any(p.poll() not in (None, 0) for p in procs))
        wall = time.perf_counter() - t0
        res = [json.loads(ln) if ln else None for ln in lines]
        sums = {}
        if all(res):
            for k in ("rss_gb", "pss_gb", "uss_gb"):
                sums[k] = sum(r["after_first_batch"][k] for r in res)
            sums["before_pss_gb"] = sum(r["before"]["pss_gb"] for r in res)
        for p in procs:
            try:
                p.stdin.write("\n")
                p.stdin.flush()
            except OSError:
                pass
        errs = [p.communicate(timeout=120)[1] for p in procs]
        for p in procs:
            self.live.remove(p)
        if not all(res):
            raise RuntimeError(f"a rank failed: {[e[-2000:] for e in errs if e]}")
        return {"ranks": n, "wall_to_all_first_batches_s": wall, "sum": sums, "tree_peak_gb": self.tree_peak,
                "max_constructor_s": max(r["constructor_s"] for r in res),
                "max_first_batch_s": max(r["first_batch_s"] for r in res),
                "builders": sum(1 for r in res if r["constructor_s"] > 0.5 * max(x["constructor_s"] for x in res))}

    def kill_all(self) -> None:
        for p in self.live:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
        self.live.clear()


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------
def _drop_index(ann: Path, env: dict) -> None:
    code = ("import sys; from dali_objcrop.index import index_path, gt_path; p = index_path(sys.argv[1]); "
            "[q.unlink() for q in (p, gt_path(p)) if q.exists()]")
    subprocess.run([sys.executable, "-c", code, str(ann)], env=env, check=True)


def measure(n: int, work: Path, runner: Runner, env: dict, ranks: int, json_load: bool) -> dict:
    t = time.perf_counter()
    ann = make_dataset(work / f"n{n}", n)
    row = {"images": n, "json_mb": ann.stat().st_size / 1e6, "make_s": time.perf_counter() - t}
    store = work / f"n{n}" / "gt.boxes"
    if not store.exists():
        row["store"] = runner.run({"what": "store", "json": str(ann), "store": str(store)})
    spec = {"what": "loader", "json": str(ann), "store": str(store)}
    if json_load:
        row["json_load"] = runner.run({"what": "json_load", "json": str(ann)})
        print(f"  json.load: {row['json_load']['seconds']:.2f} s, peak {row['json_load']['peak_gb']:.2f} GB",
              flush=True)
    _drop_index(ann, env)
    row["index_alone"] = runner.run({"what": "index", "json": str(ann)})
    print(f"  index build alone: {row['index_alone']['seconds']:.2f} s, peak {row['index_alone']['peak_gb']:.2f} GB "
          f"(scan workers {row['index_alone']['workers_peak_gb']:.2f} GB each at most)", flush=True)
    _drop_index(ann, env)
    row["first_build"] = runner.run(spec)
    row["cached"] = runner.run(spec)
    for k in ("first_build", "cached"):
        r = row[k]
        print(f"  {k}: constructor {r['constructor_s']:.2f} s, first batch {r['first_batch_s']:.2f} s, peak "
              f"{r['after_constructor']['peak_gb']:.2f} GB (children {r['children_peak_gb']:.2f}; all together "
              f"{r['tree_peak_gb']:.2f} GB PSS), after first batch "
              f"RSS {r['after_first_batch']['rss_gb']:.2f} / PSS {r['after_first_batch']['pss_gb']:.2f} GB", flush=True)
    if ranks > 1:
        row["ranks_cached"] = runner.ranks(spec, ranks)
        _drop_index(ann, env)
        row["ranks_first_build"] = runner.ranks(spec, ranks)
        for k in ("ranks_cached", "ranks_first_build"):
            r = row[k]
            print(f"  {ranks} ranks {k[6:]}: all first batches after {r['wall_to_all_first_batches_s']:.1f} s, "
                  f"PSS sum {r['sum']['pss_gb']:.2f} GB, peak of the tree {r['tree_peak_gb']:.2f} GB", flush=True)
    return row


def derive(rows: list[dict]) -> dict:
    """Ratios, and memory added over the smallest set (same process kinds)."""
    ref = rows[0]
    out = []
    for r in rows:
        d = {"images": r["images"]}
        jl = r.get("json_load")
        fb, ca = r["first_build"], r["cached"]
        ia = r.get("index_alone")
        if jl:
            d["first_build_over_json_load"] = fb["constructor_s"] / jl["seconds"]
            if ia:
                d["index_build_alone_over_json_load"] = ia["seconds"] / jl["seconds"]
        if ia:
            d["index_build_alone_peak_gb"] = ia["peak_gb"]
        d["first_build_tree_pss_peak_gb"] = fb.get("tree_peak_gb")
        if jl:
            d["cached_first_batch_over_json_load"] = ca["first_batch_s"] / jl["seconds"]
        d["first_build_peak_gb"] = max(fb["after_constructor"]["peak_gb"], fb["after_first_batch"]["peak_gb"])
        d["cached_added_rss_gb"] = ca["after_first_batch"]["rss_gb"] - ref["cached"]["after_first_batch"]["rss_gb"]
        d["cached_added_pss_gb"] = ca["after_first_batch"]["pss_gb"] - ref["cached"]["after_first_batch"]["pss_gb"]
        if "ranks_cached" in r and "ranks_cached" in ref:
            d["ranks_cached_added_pss_gb"] = (r["ranks_cached"]["sum"]["pss_gb"]
                                              - ref["ranks_cached"]["sum"]["pss_gb"])
            d["ranks_cached_added_rss_gb"] = (r["ranks_cached"]["sum"]["rss_gb"]
                                              - ref["ranks_cached"]["sum"]["rss_gb"])
        out.append(d)
    return {"per_size": out}


def plot(res: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    n = [r["images"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    jl = [(r["images"], r["json_load"]["seconds"]) for r in rows if "json_load" in r]
    if jl:
        ax[0].plot(*zip(*jl), "k--o", label="json.load of the file")
    ax[0].plot(n, [r["first_build"]["constructor_s"] for r in rows], "C3-o", label="loader, first build")
    ax[0].plot(n, [r["index_alone"]["seconds"] for r in rows], "C1-.o", label="index build alone")
    ax[0].plot(n, [r["cached"]["first_batch_s"] for r in rows], "C0-o", label="loader, cached: to first batch")
    ax[0].set(xscale="log", yscale="log", xlabel="images", ylabel="seconds", title="start-up time")
    ax[0].legend()
    jl = [(r["images"], r["json_load"]["peak_gb"]) for r in rows if "json_load" in r]
    if jl:
        ax[1].plot(*zip(*jl), "k--o", label="json.load peak")
    ax[1].plot(n, [r["index_alone"]["peak_gb"] for r in rows], "C1-.o", label="index build alone, peak")
    ax[1].plot(n, [r["first_build"]["tree_peak_gb"] for r in rows], "C3-o", label="loader first build, all processes (PSS)")
    ax[1].plot(n, [r["cached"]["after_first_batch"]["rss_gb"] for r in rows], "C0-o", label="cached, RSS after batch 1")
    ax[1].plot(n, [r["cached"]["after_first_batch"]["pss_gb"] for r in rows], "C0:o", label="cached, PSS after batch 1")
    ax[1].set(xscale="log", xlabel="images", ylabel="GB", title="memory (one rank)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="where the synthetic sets go (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic sets")
    ap.add_argument("--no-json-load", action="store_true", help="skip json.load (it needs ~6 GB per 1M images)")
    ap.add_argument("--json-load-max", type=int, default=1_000_000, help="largest N for json.load (memory)")
    ap.add_argument("--max-gb", type=float, default=9.0, help="kill the measured processes past this memory")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "index_scale.json"))
    a = ap.parse_args()
    if a.child:
        res = child(json.loads(a.child))
        if res:
            print(json.dumps(res))
        return 0
    if not COCO.exists():
        raise SystemExit(f"{COCO} not found (the real photos live in ../shared)")
    sizes = [int(s) for s in a.sizes.split(",")]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="objcrop_index_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("DALI_OBJCROP_HOME", str(Path.home() / ".cache" / "dali_objcrop"))
    runner = Runner(a.max_gb, env)
    rows = []
    t0 = time.time()
    try:
        for n in sizes:
            print(f"{n} images:", flush=True)
            rows.append(measure(n, work, runner, env, a.ranks, not a.no_json_load and n <= a.json_load_max))
    except KeyboardInterrupt:
        runner.kill_all()
        print("interrupted", file=sys.stderr)
    finally:
        runner.kill_all()
        if not a.keep:
            for n in sizes:   # the index files of the sets, then the sets
                if (work / f"n{n}" / "annotations.json").exists():
                    _drop_index(work / f"n{n}" / "annotations.json", env)
            shutil.rmtree(work, ignore_errors=True)
    if not rows:
        return 1
    res = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "host": platform.node(),
           "cpus": os.cpu_count(), "python": platform.python_version(), "seconds": time.time() - t0,
           "rows": rows, "derived": derive(rows)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    plot(res, out.with_suffix(".png"))
    print(json.dumps(res["derived"], indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
