"""``vitscale bench --what data``: our shard loader vs torchvision ImageFolder + DataLoader vs decode-only.

All three read the same JPEG files: random crops (256-500 px a side by default) of scikit-image's bundled colour
photos, written once into a temporary ImageFolder tree and, byte for byte, into WebDataset shards. Both loaders
use the same number of worker processes, batch size and training transform: RandomResizedCrop(img_size,
scale=(crop_min_scale, 1), ratio 3/4..4/3) + horizontal flip + ImageNet normalisation to float32. Ours normalises
in the consuming process, as the trainer does (on the device there), after uint8 batches cross the process
boundary; torchvision's reference recipe normalises in the workers and ships float32 (4x the bytes).

The decode-only limit decodes the same files (read + ``data.transforms.decode``: simplejpeg, the decoder our pipeline
uses) in a bare loop in as many processes as there are workers. Per-image single-core costs (read, decode,
crop+resize+flip, normalise) say what bounds the loader; "reduced decode" is what the loader does per image
(data/reduced_decode.py: a JPEG whose crop is >= 3x the output decodes at 1/2-1/8 size) vs decode + transform.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
import psutil
import skimage.data

from vitscale.bench.common import print_table
from vitscale.bench.data_inputs import imagenet_like, tar_costs, webdataset_tar_reader
from vitscale.data.pipeline import build_train_loader
from vitscale.data.writer import write_shards
from vitscale.data.reduced_decode import train_image
from vitscale.data.transforms import _decode_pil, decode, train_transform
from vitscale.pixels import IMAGENET_MEAN, IMAGENET_STD, normalize


def make_images(root: Path, n: int, min_size: int = 256, max_size: int = 500, seed: int = 0,
                imagenet: bool = False) -> list[Path]:
    """``n`` JPEG crops (quality 90) of the skimage photos in an ImageFolder tree ``root/<photo>/<i>.jpg``; with
    ``imagenet``, ImageNet-sized files instead (see :func:`_imagenet_like`)."""
    if imagenet:
        return imagenet_like(root, n, seed)

    if n < 1 or not 16 <= min_size <= max_size:
        raise ValueError(f"bench data: need --images >= 1 and 16 <= --min-size <= --max-size (got {n}, "
                         f"{min_size}, {max_size})")
    photos = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"):
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a photo that would need a download
            continue
        if img.ndim == 3 and img.shape[2] >= 3 and min(img.shape[:2]) >= min_size:
            photos[name] = np.ascontiguousarray(img[:, :, :3])
    if not photos:
        raise ValueError(f"bench data: no bundled skimage photo is at least {min_size} px a side")
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    files = []
    for i in range(n):
        name = names[i % len(names)]
        img = photos[name]
        h = int(rng.integers(min_size, min(max_size, img.shape[0]) + 1))
        w = int(rng.integers(min_size, min(max_size, img.shape[1]) + 1))
        top, left = int(rng.integers(img.shape[0] - h + 1)), int(rng.integers(img.shape[1] - w + 1))
        path = root / name / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[top:top + h, left:left + w]).save(path, format="JPEG", quality=90)
        files.append(path)
    return files


def write_bench_shards(files: list[Path], out: Path, num_shards: int) -> list[str]:
    """The same JPEG bytes as WebDataset shards (label = photo index in sorted order)."""
    classes = sorted({f.parent.name for f in files})
    samples = ((f"img{i:06d}", f.read_bytes(), "jpg", classes.index(f.parent.name)) for i, f in enumerate(files))
    manifest = write_shards(samples, out, "bench", maxcount=-(-len(files) // num_shards), class_names=classes)
    return [str(out / s["name"]) for s in manifest["shards"]]


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def _cpu_seconds(pids: set[int], main: bool) -> float:
    """CPU time so far of the processes ``pids`` (and of this process if ``main``)."""
    total = sum(psutil.Process().cpu_times()[:2]) if main else 0.0
    for pid in pids:
        try:
            total += sum(psutil.Process(pid).cpu_times()[:2])
        except psutil.Error:  # a process that just exited
            pass
    return total


def _wait_idle(pids: set[int], timeout: float = 60.0) -> None:
    """Wait until ``pids`` stop using CPU: the loader not being timed refills its prefetch queue after its own
    round, and that work must neither slow nor be charged to the next measurement."""
    end = time.perf_counter() + timeout
    last = _cpu_seconds(pids, main=False)
    while time.perf_counter() < end:
        time.sleep(0.05)
        now = _cpu_seconds(pids, main=False)
        if now - last < 0.002:
            return
        last = now


class Round:
    """Median wall-clock throughput and CPU cost per image over rounds (robust on a busy machine: CPU
    seconds per image do not grow when other processes take the cores)."""

    def __init__(self):
        self.img_s: list[float] = []
        self.cpu_ms: list[float] = []
        self.main_ms: list[float] = []

    def add(self, images: int, wall: float, cpu: float, main_cpu: float = 0.0) -> None:
        self.img_s.append(images / wall)
        self.cpu_ms.append(1000 * cpu / images)
        self.main_ms.append(1000 * main_cpu / images)

    def summary(self) -> dict[str, Any]:
        return {"img_per_s": statistics.median(self.img_s), "cpu_ms_per_image": statistics.median(self.cpu_ms),
                "consumer_cpu_ms_per_image": statistics.median(self.main_ms), "rounds_img_per_s": self.img_s}


def _timed_batches(it, batch: int, warmup: int, batches: int, rec: Round, pids: set[int], consume=None) -> None:
    """Skip ``warmup`` batches (the ones prefetched while another loader was timed), then time ``batches``;
    CPU is counted for this process (it consumes and, for ours, normalises) and the loader's workers ``pids``."""
    for _ in range(warmup):
        b = next(it)
        if consume:
            consume(b)
    m0, c0, t0 = _cpu_seconds(set(), main=True), _cpu_seconds(pids, main=True), time.perf_counter()
    for _ in range(batches):
        b = next(it)
        if consume:
            consume(b)
    wall = time.perf_counter() - t0
    rec.add(batch * batches, wall, _cpu_seconds(pids, main=True) - c0, _cpu_seconds(set(), main=True) - m0)


def ours_iterator(urls: list[str], batch: int, workers: int, img_size: int, crop_min_scale: float):
    loader = build_train_loader(urls, batch_size=batch, img_size=img_size, seed=0, rank=0, world_size=1,
                                num_workers=workers, crop_min_scale=crop_min_scale)
    return iter(loader)


def wds_reader_iterator(urls: list[str], batch: int, workers: int, img_size: int, crop_min_scale: float):
    """Our loader with webdataset's tar reader in its workers (patched in while they fork: they keep it)."""
    with webdataset_tar_reader():
        return ours_iterator(urls, batch, workers, img_size, crop_min_scale)


def _forever(loader):
    while True:  # persistent workers: a new epoch does not restart them
        yield from loader


def imagefolder_iterator(root: Path, batch: int, workers: int, img_size: int, crop_min_scale: float):
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomResizedCrop(img_size, scale=(crop_min_scale, 1.0), antialias=True),
                     v2.RandomHorizontalFlip(), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(str(root), transform=tf)
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                    persistent_workers=workers > 0, worker_init_fn=_one_thread,
                    generator=torch.Generator().manual_seed(0))
    return _forever(dl)


def _one_thread(_worker_id: int = 0) -> None:
    torch.set_num_threads(1)  # what our loader's workers do too


def _decode_files(paths: list[str]) -> int:
    for p in paths:
        with open(p, "rb") as f:
            decode(f.read())
    return len(paths)


def decode_only_round(pool, files: list[Path], procs: int, rec: Round, pids: set[int]) -> None:
    """Read + decode every file once, split over the ``procs`` pool processes ``pids``."""
    paths = [str(f) for f in files]
    chunks = [paths[i::procs] for i in range(procs)]
    c0, t0 = _cpu_seconds(pids, main=False), time.perf_counter()
    done = sum(pool.map(_decode_files, chunks))
    rec.add(done, time.perf_counter() - t0, _cpu_seconds(pids, main=False) - c0)


def per_image_costs(files: list[Path], img_size: int, crop_min_scale: float, passes: int = 3) -> dict[str, float]:
    """Single-core milliseconds per image for each stage, on up to 128 of the files: image by image as a worker
    does (so freed buffers are reused, as in the loader), the best of ``passes`` passes."""
    blobs = [f.read_bytes() for f in files[:128]]
    stages = ("read", "decode", "transform", "normalize", "decode_pil", "reduced_decode_transform")
    best = {k: float("inf") for k in stages}
    pixels = []
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for p in range(passes):
            took = dict.fromkeys(stages, 0.0)
            g, g2 = torch.Generator().manual_seed(p), torch.Generator().manual_seed(p)
            for f, b in zip(files, blobs):  # the worker's sequence, image by image
                t0 = time.perf_counter()
                f.read_bytes()
                t1 = time.perf_counter()
                img = decode(b)
                t2 = time.perf_counter()
                out = train_transform(img, img_size, g, crop_min_scale)
                t3 = time.perf_counter()
                normalize(out)
                t4 = time.perf_counter()
                for k, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    took[k] += dt
                if p == 0:
                    pixels.append(img.shape[1] * img.shape[2])
            t0 = time.perf_counter()  # the alternatives in loops of their own (interleaving them skews caches)
            for b in blobs:
                _decode_pil(b)
            took["decode_pil"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for b in blobs:
                train_image(b, img_size, g2, crop_min_scale)
            took["reduced_decode_transform"] = time.perf_counter() - t0
            best = {k: min(best[k], took[k]) for k in stages}
    finally:
        torch.set_num_threads(torch_threads)
    ms = {k: 1000 * v / len(blobs) for k, v in best.items()}
    ms["mean_kb"] = sum(len(b) for b in blobs) / len(blobs) / 1024
    ms["mean_pixels"] = float(statistics.mean(pixels))
    return ms


def run_data_bench(images: int = 512, min_size: int = 256, max_size: int = 500, batch: int = 32,
                   workers: int = 2, img_size: int = 224, crop_min_scale: float = 0.35, batches: int = 10,
                   rounds: int = 3, warmup: Optional[int] = None, workdir: Optional[str] = None,
                   imagenet: bool = False, tar_readers: bool = False) -> dict[str, Any]:
    """Generate the files; time ours, ImageFolder and decode-only in alternating rounds; return the results."""
    if batch < 1 or workers < 0 or batches < 1 or img_size < 8 or rounds < 1:
        raise ValueError(f"bench data: need --batch-size >= 1, --workers >= 0, --batches >= 1, --img-size >= 8, "
                         f"--rounds >= 1 (got {batch}, {workers}, {batches}, {img_size}, {rounds})")
    warmup = 2 * max(workers, 1) if warmup is None else warmup  # DataLoader prefetches 2 batches per worker
    procs = max(workers, 1)
    if images < max(batch, 2 * procs):  # ImageFolder drops the last partial batch; each worker needs a shard
        raise ValueError(f"bench data: --images ({images}) must be at least --batch-size ({batch}) and 2 x workers "
                         f"({2 * procs})")
    with tempfile.TemporaryDirectory(prefix="vitscale-bench-data-", dir=workdir) as tmp:
        root = Path(tmp)
        files = make_images(root / "folder", images, min_size, max_size, imagenet=imagenet)
        urls = write_bench_shards(files, root / "shards", num_shards=max(2 * procs, 2))
        costs = per_image_costs(files, img_size, crop_min_scale)
        if tar_readers:
            costs.update(tar_costs(urls))
        recs = _timed_rounds(files, urls, root / "folder", batch, workers, img_size, crop_min_scale, batches,
                             rounds, warmup, tar_readers)
    res = {k: r.summary() for k, r in recs.items()}
    return {"images": images, "size_range": [375, 500] if imagenet else [min_size, max_size], "imagenet": imagenet,
            "batch": batch, "workers": workers, "img_size": img_size, "crop_min_scale": crop_min_scale, "timed_batches": batches, "warmup": warmup,
            "rounds": rounds, "cores": os.cpu_count() or 1, **_compare(res, costs, img_size)}


def _timed_rounds(files: list[Path], urls: list[str], folder_root: Path, batch: int, workers: int, img_size: int,
                  crop_min_scale: float, batches: int, rounds: int, warmup: int,
                  tar_readers: bool = False) -> dict[str, Round]:
    """Start the three loaders (their processes before any timing), then time them in alternating rounds, each
    while the others' processes are idle. The loaders' workers end when this returns."""
    procs = max(workers, 1)
    recs = {"vitscale": Round(), "imagefolder": Round(), "decode_only": Round()}
    base = _children()
    ours = ours_iterator(urls, batch, workers, img_size, crop_min_scale)  # starts its workers
    ours_pids = _children() - base
    folder = imagefolder_iterator(folder_root, batch, workers, img_size, crop_min_scale)
    next(folder)  # starts its workers
    folder_pids = _children() - base - ours_pids
    loaders = [("vitscale", ours, ours_pids)]
    if tar_readers:  # the same loader with webdataset's tar reader: the ratio of the two is the reader's worth
        recs["vitscale_wds_tar"] = Round()
        wds = wds_reader_iterator(urls, batch, workers, img_size, crop_min_scale)
        loaders.append(("vitscale_wds_tar", wds, _children() - base - ours_pids - folder_pids))
        folder_pids = folder_pids - loaders[1][2]
    threads = torch.get_num_threads()
    # The consumer normalises with one thread: with more, OpenMP threads spin against the busy workers on a
    # small machine (measured: 1.06 vs 0.31 ms/img on 2 cores); a GPU trainer does it on the device anyway.
    torch.set_num_threads(1)
    try:
        with mp.get_context("fork").Pool(procs, initializer=_one_thread) as pool:
            pool.map(_decode_files, [[str(files[0])]] * procs)  # processes started before timing
            loader_pids = set().union(*(pids for _, _, pids in loaders))
            pool_pids = _children() - base - loader_pids - folder_pids
            everyone = loader_pids | folder_pids | pool_pids
            for _ in range(rounds):
                # ours normalises in the consumer like the trainer; torchvision's recipe did it in the workers
                for name, it, pids in loaders:
                    _wait_idle(everyone - pids)
                    _timed_batches(it, batch, warmup, batches, recs[name], pids,
                                   consume=lambda b: normalize(b["image"]))
                _wait_idle(everyone - folder_pids)
                _timed_batches(folder, batch, warmup, batches, recs["imagefolder"], folder_pids)
                _wait_idle(everyone - pool_pids)
                decode_only_round(pool, files, procs, recs["decode_only"], pool_pids)
    finally:
        torch.set_num_threads(threads)
    return recs


def _compare(res: dict[str, dict], costs: dict[str, float], img_size: int) -> dict[str, Any]:
    """Throughput and CPU ratios between the loaders, and where our CPU time per image goes."""
    def ratio(a: float, b: float) -> Optional[float]:
        return a / b if b > 0 else None  # CPU times tick in 10 ms: a tiny run can measure 0

    ips = {k: v["img_per_s"] for k, v in res.items()}
    cpu = {k: v["cpu_ms_per_image"] for k, v in res.items()}
    # Our CPU per image = workers (read, decode, transform + the rest: tar parsing, seeding, collate, shared-memory
    # hand-over) + the consumer (receiving the batch, normalising it), each measured, the parts from single-core
    # stage timings.
    consumer = res["vitscale"]["consumer_cpu_ms_per_image"]
    workers_ms = cpu["vitscale"] - consumer
    # Where reduced-size decoding applies, the workers' decode + transform is its cost, split as the full path's is.
    shrink = min(1.0, costs["reduced_decode_transform"] / (costs["decode"] + costs["transform"]))
    stages = {"read": costs["read"], "decode": shrink * costs["decode"], "transform": shrink * costs["transform"]}
    stages["worker rest (tar, seeds, collate, IPC)"] = max(workers_ms - sum(stages.values()), 0.0)
    stages["normalize"] = costs["normalize"]
    stages["consumer rest (receive)"] = max(consumer - costs["normalize"], 0.0)
    tar = {}
    if "vitscale_wds_tar" in ips:  # > 1: our tar reader is faster end to end
        tar = {"tar_reader_speedup": ips["vitscale"] / ips["vitscale_wds_tar"],
               "tar_reader_cpu_saving": ratio(cpu["vitscale_wds_tar"], cpu["vitscale"]),
               "tar_reader_rounds": [a / b for a, b in zip(res["vitscale"]["rounds_img_per_s"],
                                                           res["vitscale_wds_tar"]["rounds_img_per_s"])]}
    return {**tar, "img_per_s": ips, "cpu_ms_per_image": cpu,
            "ratio_vs_imagefolder": ips["vitscale"] / ips["imagefolder"],
            "cpu_ratio_vs_imagefolder": ratio(cpu["imagefolder"], cpu["vitscale"]),
            "fraction_of_decode_only": ips["vitscale"] / ips["decode_only"],
            "cpu_fraction_of_decode_only": ratio(cpu["decode_only"], cpu["vitscale"]),
            "per_image_ms": costs, "stage_ms": stages, "bound": max(stages, key=stages.get), "details": res,
            "ipc_kb_per_image": {"vitscale_uint8": 3 * img_size ** 2 / 1024,
                                 "imagefolder_float32": 12 * img_size ** 2 / 1024},
            "reduced_decode_speedup": (costs["decode"] + costs["transform"]) / costs["reduced_decode_transform"]}


def _x(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def print_data_bench(r: dict[str, Any]) -> None:
    c, ips, cpu = r["per_image_ms"], r["img_per_s"], r["cpu_ms_per_image"]
    print(f"vitscale bench data: {r['images']} JPEGs of {r['size_range'][0]}-{r['size_range'][1]} px "
          f"(mean {c['mean_kb']:.0f} KB, {c['mean_pixels'] / 1e3:.0f} kpixels), batch {r['batch']}, "
          f"{r['workers']} workers, {r['cores']} cores; RandomResizedCrop({r['img_size']}, scale=({r['crop_min_scale']}"
          f", 1)) + flip + normalise; median of {r['rounds']} alternating rounds of {r['timed_batches']} batches "
          f"(after {r['warmup']} untimed)")
    print_table(["loader", "img/s", "vs ImageFolder", "of decode-only", "CPU ms/img", "CPU vs ImageFolder"], [
        ["vitscale shards (uint8 batches)", f"{ips['vitscale']:.1f}", f"{r['ratio_vs_imagefolder']:.2f}x",
         f"{100 * r['fraction_of_decode_only']:.0f}%", f"{cpu['vitscale']:.2f}", _x(r["cpu_ratio_vs_imagefolder"])],
        ["ImageFolder + DataLoader (float32)", f"{ips['imagefolder']:.1f}", "1.00x",
         f"{100 * ips['imagefolder'] / ips['decode_only']:.0f}%", f"{cpu['imagefolder']:.2f}", "1.00x"],
        ["decode only (read + decode)", f"{ips['decode_only']:.1f}", f"{ips['decode_only'] / ips['imagefolder']:.2f}x",
         "100%", f"{cpu['decode_only']:.2f}",
         _x(cpu["imagefolder"] / cpu["decode_only"] if cpu["decode_only"] else None)]])
    if "tar_reader_speedup" in r:
        print(f"tar readers: vitscale's tarstream vs webdataset's tar_file_iterator in the same loader: "
              f"{ips['vitscale']:.1f} vs {ips['vitscale_wds_tar']:.1f} img/s ({r['tar_reader_speedup']:.3f}x; "
              f"per round {', '.join(f'{x:.3f}' for x in r['tar_reader_rounds'])}), CPU "
              f"{cpu['vitscale']:.3f} vs {cpu['vitscale_wds_tar']:.3f} ms/img; reading alone "
              f"{c['tar_ours_us']:.0f} vs {c['tar_wds_us']:.0f} us per sample (one core)")
    st = r["stage_ms"]
    share = (lambda v: f" ({100 * v / cpu['vitscale']:.0f}%)") if cpu["vitscale"] > 0 else (lambda v: "")
    parts = ", ".join(f"{k} {v:.2f} ms{share(v)}" for k, v in st.items())
    print(f"our CPU time per image ({cpu['vitscale']:.2f} ms, workers + consumer): {parts}; bound: {r['bound']}")
    print(f"single-core stage costs: PIL decode {c['decode_pil']:.2f} ms vs torchvision {c['decode']:.2f} ms; IPC per "
          f"image {r['ipc_kb_per_image']['vitscale_uint8']:.0f} KB (uint8) vs "
          f"{r['ipc_kb_per_image']['imagefolder_float32']:.0f} KB (float32)")
    print(f"what the loader does per image (reduced-size decoding where the crop is >= 3x the output): "
          f"{c['reduced_decode_transform']:.2f} ms vs decode+transform {c['decode'] + c['transform']:.2f} ms "
          f"(speed-up {r['reduced_decode_speedup']:.2f}x)")
