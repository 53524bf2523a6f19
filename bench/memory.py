"""Peak memory (RSS) of extract-features' consolidation and of train-head at UCF101 scale (not a test).

Synthetic data of the real shape: the UCF101 split-1 video names (``../shared/data/splits/ucf101``, 13,320
videos, 101 classes; ``--videos 1332`` takes every 10th), ResNet-18 widths (512-d rgb and flow), P = 25
positions, one view, float16, random values.

* ``features``: per-video parts (``parts/<video_id>.h5``, written with :func:`pipeline.features.write_part`)
  consolidated into ``features.zarr`` by ``stages.extract_features._consolidate``, in a child process.
* ``train-head``: a ``features.zarr`` of that shape registered as a finished extract-features output (a test-only
  stage with the real stage's version, as ``tests/test_train_head.py`` does), then ``pipeline train-head --head tsn
  --max-epochs 1 --segments 5 --device cpu [--max-memory ...]`` in a child process.

Each child's peak RSS is its ``ru_maxrss`` (``os.wait4``); ``import`` is a child that only imports the module
the measured one runs (torch and the pipeline), the floor under every figure. ``--repo`` runs the children on
another checkout (e.g. ``/work/main`` for the figures before a change); the synthetic data is written by this
checkout's code (same store format) and kept under ``--work`` for the next run.

    .venv/bin/python bench/memory.py features --videos 1332 13320
    .venv/bin/python bench/memory.py train-head --videos 13320 --max-memory 2G
    .venv/bin/python bench/memory.py train-head --videos 13320 --repo /work/main --max-memory none
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPLITS = REPO.parent / "shared" / "data" / "splits" / "ucf101"
P, DIM, VIEWS = 25, 512, 1
VAL_GROUPS = ("g08", "g09")  # held out of split 1's training groups (8-25), as decode's hold-out would


def ucf101_videos(n: int) -> list[tuple[str, int, str]]:
    """(video id, class index, split-1 membership) of ``n`` videos: all 13,320 or every k-th."""
    classes = {line.split()[1]: int(line.split()[0]) - 1
               for line in (SPLITS / "classInd.txt").read_text().split("\n") if line.strip()}
    rows = []
    for name, part in (("trainlist01.txt", "train"), ("testlist01.txt", "test")):
        for line in (SPLITS / name).read_text().split("\n"):
            if line.strip():
                vid = line.split()[0].removesuffix(".avi")
                group = vid.split("_")[-2]
                rows.append((vid, classes[vid.split("/")[0]], "val" if part == "train" and group in VAL_GROUPS
                             else part))
    rows.sort()
    step = max(1, len(rows) // n)
    return rows[::step][:n]


def _features(k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(k)
    return {s: rng.random((P, VIEWS, DIM), dtype=np.float32).astype(np.float16) for s in ("rgb", "flow")}


def make_parts(folder: Path, videos: list[tuple[str, int, str]]) -> None:
    from pipeline.features import VideoFeatures, write_part
    from pipeline.io.store import VideoStore

    done = folder / "complete"
    if done.exists():
        return
    parts = VideoStore(folder / "parts", "h5")
    for k, (vid, _, _) in enumerate(videos):
        write_part(parts, VideoFeatures(vid, np.arange(P, dtype=np.float32) * 4, _features(k), 0))
    done.write_text("ok\n")


# The child: the repo's _consolidate with the few fields it reads from the stage context and plan.
CONSOLIDATE = """
import sys, types
from pathlib import Path
import numpy as np
import stages.extract_features as ef
from pipeline.features import StreamSource
from pipeline.io.store import VideoStore
work, store, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rows = [line.split("\\t") for line in (work / "videos.tsv").read_text().splitlines()]
classes = sorted({r[0].split("/")[0] for r in rows})
table = types.SimpleNamespace(video_ids=[r[0] for r in rows], labels=[int(r[1]) for r in rows],
                              groups=[r[0].rsplit("_", 1)[0] for r in rows], classes=classes, dataset="ucf101",
                              split_of=lambda split: [r[2] for r in rows])
src = {s: StreamSource(s, "resnet18", "none", None, None, 3 if s == "rgb" else 20, 112, 0 if s == "rgb" else 10,
                       %(dim)d) for s in ("rgb", "flow")}
fp = types.SimpleNamespace(table=table, sources=src, outputs=[store])
out = work / "out"
out.mkdir(exist_ok=True)
ctx = types.SimpleNamespace(params=ef.ExtractFeaturesParams(positions=%(P)d, views=%(views)d, store=store),
                            fingerprint="bench", upstream=types.SimpleNamespace(fingerprints=lambda: {}), dir=out)
ef._consolidate(ctx, fp, list(range(n)), VideoStore(work / "parts", "h5"))
""" % {"dim": DIM, "P": P, "views": VIEWS}

IMPORT_ONLY = {"features": "import stages.extract_features, zarr, h5py",
               "train-head": "import stages.cli, stages.train_head, zarr, h5py"}


def run_child(cmd: list[str], repo: Path) -> tuple[float, float, int]:
    """(peak RSS in MiB, seconds, exit status) of one child process."""
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(err.decode(errors="replace")[-3000:])
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, proc.returncode


def features_command(videos: list[tuple[str, int, str]], work: Path, store: str = "zarr") -> list[str]:
    """The child that consolidates the parts of ``videos`` (written under ``work`` first, kept for next time)."""
    work = work / f"parts-{len(videos)}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "videos.tsv").write_text("".join(f"{v}\t{c}\t{s}\n" for v, c, s in videos))
    make_parts(work, videos)
    shutil.rmtree(work / "out", ignore_errors=True)
    return [sys.executable, "-c", CONSOLIDATE, str(work), store, str(len(videos))]


def make_cache(cache: Path, videos: list[tuple[str, int, str]]) -> None:
    """A finished extract-features output (split 1, resnet18) holding a synthetic store of ``videos``."""
    from dataclasses import dataclass

    from pipeline.io import artifacts
    from pipeline.io.store import FeatureSet, feature_store_path, write_feature_store
    from pipeline.stage import Plan, Stage, param, run_stage
    from stages.extract_features import VERSION

    if (cache / artifacts.features_key(1, "resnet18") / "manifest.json").exists():
        return
    v = len(videos)
    streams = {s: np.empty((v, P, VIEWS, DIM), np.float16) for s in ("rgb", "flow")}
    for k in range(v):
        for s, a in _features(k).items():
            streams[s][k] = a
    classes = sorted({vid.split("/")[0] for vid, _, _ in videos})
    fs = FeatureSet(streams=streams, positions=np.tile(np.arange(P, dtype=np.float32) * 4, (v, 1)),
                    video_ids=np.array([x[0] for x in videos]), labels=np.array([x[1] for x in videos]),
                    split=np.array([x[2] for x in videos]), groups=np.array([x[0].rsplit("_", 1)[0] for x in videos]),
                    class_names=np.array(classes), attrs={"split_id": 1, "view_names": ["center"]})

    @dataclass(frozen=True)
    class BenchFeatures:
        videos: int = param(0, "videos")

    def run(ctx, plan):
        write_feature_store(feature_store_path(ctx.dir, "zarr"), fs)
        return {}

    stage = Stage(name="extract-features", version=VERSION, params_type=BenchFeatures, run=run,
                  plan=lambda p, u: Plan(str(v)), key=lambda p: artifacts.features_key(1, "resnet18"))
    run_stage(stage, BenchFeatures(v), cache, force=True)


def train_head_command(videos: list[tuple[str, int, str]], work: Path, max_memory: str = "2G") -> list[str]:
    """The child that runs train-head on a store of ``videos`` (cached under ``work``, kept for next time)."""
    cache = work / f"cache-{len(videos)}"
    make_cache(cache, videos)
    cmd = [sys.executable, "-m", "stages", "train-head", "--cache-dir", str(cache), "--backbone", "resnet18",
           "--head", "tsn", "--segments", "5", "--max-epochs", "1", "--device", "cpu", "--force"]
    return cmd + (["--max-memory", max_memory] if max_memory != "none" else [])


def measure(what: str, counts: list[int], repo: Path = REPO, work: Path = Path("/tmp/bench-memory"),
            **options) -> list[dict]:
    """Peak RSS (MiB) and seconds of the import-only child, then of ``what`` (features / train-head) at each
    number of videos in ``counts``, the children running ``repo``'s code; ``options``: ``store`` (features) or
    ``max_memory`` (train-head)."""
    peak, seconds, _ = run_child([sys.executable, "-c", IMPORT_ONLY[what]], repo)
    rows = [{"videos": "import", "peak_mib": peak, "seconds": seconds}]
    command = features_command if what == "features" else train_head_command
    for n in counts:
        peak, seconds, rc = run_child(command(ucf101_videos(n), work, **options), repo)
        rows.append({"videos": n, "peak_mib": peak, "seconds": seconds, "failed": rc != 0})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("features", "train-head"))
    ap.add_argument("--videos", type=int, nargs="+", default=[1332, 13320])
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout whose code the children run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-memory"), help="synthetic data (kept)")
    ap.add_argument("--store", default="zarr", choices=("zarr", "h5"), help="features: the consolidated store")
    ap.add_argument("--max-memory", default="2G", help="train-head --max-memory (none: not passed)")
    args = ap.parse_args()
    args.repo = args.repo.resolve()
    options = {"store": args.store} if args.what == "features" else {"max_memory": args.max_memory}
    rows = measure(args.what, args.videos, args.repo, args.work, **options)
    print(f"{args.what} on {args.repo}" + (f", --max-memory {args.max_memory}" if args.what == "train-head" else ""))
    print("| videos | peak RSS (MiB) | seconds |\n|---|---|---|")
    for r in rows:
        print(f"| {r['videos']} | {r['peak_mib']:.0f}{' (failed)' if r.get('failed') else ''} | {r['seconds']:.1f} |")
    if sum(isinstance(r["videos"], int) for r in rows) == 2 and args.what == "features":
        a, b = [r["peak_mib"] for r in rows if isinstance(r["videos"], int)]
        print(f"ratio of peaks: {b / a:.2f}")


if __name__ == "__main__":
    main()
