"""Ray Data ingest: a photo archive (any fsspec URI) -> images.parquet, faces.parquet, aligned
crops and summary.json under DST.

Files are listed on the driver; analysis runs in `map_batches` on an actor pool (each actor
loads the face models once; GPU actors where the cluster has GPUs). Every analysed batch is
written as it finishes (DST/_raw_images/<run>/), so a crashed run loses at most the batches in flight,
and `resume` skips every file already recorded with the same bytes. The final tables are built
from the raw rows at the end: one images row per listed file, whatever happened to it.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
import uuid

import numpy as np
import pyarrow as pa

from ray_faceid import storage
from ray_faceid.config import IngestConfig
from ray_faceid.data import tables
from ray_faceid.data.analyze_rows import analyze_uris
from ray_faceid.errors import BadInput
from ray_faceid.progress import ProgressLine, to_stderr
from ray_faceid.watchdog import Watchdog

SETTINGS_FILE = "settings.json"  # under RAW_DIR: the settings every part of the dataset was made with
INLINE_SKIP = 1000  # recorded files passed to the actors inline; more go through the object store


class AnalyzeImages:
    """Map-batches UDF: holds one FaceAnalyzer per actor. Each batch's rows are written as soon as
    it is done (one parquet part per batch), so a crash loses only the batches in flight."""

    def __init__(self, config_json: str, dst: str, run_id: str, skip: set | None):
        import ray

        from ray_faceid.face.align import loose_template
        from ray_faceid.face.analyzer import FaceAnalyzer

        self.config = IngestConfig.model_validate_json(config_json)
        face = self.config.face
        if face.threads == 0:  # one thread per CPU this actor was given
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            face = face.model_copy(update={"threads": max(1, int(cpus))})
        self.analyzer = FaceAnalyzer(face)
        self.template = loose_template(self.config.crop_size)
        self.dst = dst if self.config.write_crops else None
        self.run_dir = storage.join(dst, tables.RAW_DIR, run_id)
        self.skip = ray.get(skip) if isinstance(skip, ray.ObjectRef) else (skip or set())

    def __call__(self, batch: dict) -> dict:
        """Analyse the batch, commit its rows as one raw part file, return its status counts."""
        uris = [str(u) for u in batch["uri"]]
        rows = analyze_uris(self.analyzer, uris, self.dst, self.template, self.skip)
        if rows:
            part = hashlib.sha256("\n".join(uris).encode()).hexdigest()[:16]
            table = pa.Table.from_pylist(rows, schema=tables.RAW_SCHEMA)
            tables.write_table(storage.join(self.run_dir, f"part-{part}.parquet"), table)
        statuses = [r["status"] for r in rows]
        return {"status": np.array(statuses + ["skipped"] * (len(uris) - len(rows)))}


def _flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same_settings(dst: str, config: IngestConfig, resumed: bool) -> None:
    """One dataset, one face stack: a resumed run with other settings (encoder, detector, crops)
    would mix embeddings that cannot be compared. The first run records its settings; a resume
    with others is refused, naming each difference. (Datasets made before this record are taken as
    they are, and get the record.)"""
    uri = storage.join(dst, tables.RAW_DIR, SETTINGS_FILE)
    current = json.loads(json.dumps(config.hashed_fields(), default=str))
    if resumed and storage.exists(uri):
        recorded = json.loads(storage.read_bytes(uri))
        old, new = _flat(recorded), _flat(current)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            raise BadInput(f"{dst} was ingested with other settings: " + "; ".join(
                f"{k} was {old.get(k)!r}, now {new.get(k)!r}" for k in changed) + ": resume with the same settings, "
                "or ingest into a new DST")
        return
    storage.write_bytes(uri, json.dumps(current, indent=2).encode())


def run_ingest(src: str, dst: str, config: IngestConfig | None = None, labels: str = "folders", resume: bool = False,
               address: str | None = None) -> dict:
    import ray

    from ray_faceid.data.cluster import cluster_gpus, free_workers, init_ray

    config = config or IngestConfig()
    if labels not in ("folders", "cluster", "none"):
        raise BadInput(f"--labels must be folders, cluster or none, not {labels!r}")
    start = time.perf_counter()
    raw = tables.read_raw(dst)
    if raw and not resume:
        raise BadInput(f"{dst} already holds ingest results: pass --resume to continue them, or use a new DST")
    # The rows name crops as paths other jobs read from other working folders (Ray Train's workers run
    # in their own): a relative DST is this one's. (Photos were always listed absolute; an older
    # ingest's relative crop paths are read by train from the folder it runs in.)
    src, dst = storage.absolute(src), storage.absolute(dst)
    listed = list(storage.list_files(src, config.extensions))
    if not listed:
        raise BadInput(f"no image files ({', '.join(config.extensions)}) under {src}")
    check_same_settings(dst, config, resumed=bool(raw))
    skip = {(r["uri"], r["sha256"]) for r in raw if r["sha256"]}

    init_ray(address)
    gpus = config.num_gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster_gpus() > 0 else 0.0
    workers = config.workers or free_workers(bool(gpus))
    # Every listed file goes through the actors: a recorded file is skipped there only if its
    # bytes still hash the same, so a changed file is analysed again.
    # Shuffled (seeded): hard files cluster in folders (non-faces take the slow CNN fallback);
    # spread over the batches they keep the actors evenly loaded.
    order = list(listed)
    random.Random(0).shuffle(order)
    blocks = max(1, -(-len(order) // config.batch_size))
    workers = min(workers, blocks)  # an actor without a block would load the face models for nothing
    ds = ray.data.from_items([{"uri": u} for u in order], override_num_blocks=blocks)
    run_id = f"run-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    ds = ds.map_batches(
        AnalyzeImages,
        # Inline when small: an object-store argument makes Ray log an error per actor.
        fn_constructor_args=(config.model_dump_json(), dst, run_id, ray.put(skip) if len(skip) > INLINE_SKIP else skip),
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=0.5 if gpus else 1,
        num_gpus=gpus,
    )
    statuses, progress = [], ProgressLine("ingest images", len(listed), emit=to_stderr)
    with Watchdog("ingest", config.stall_warn_s, config.stall_fail_s) as watchdog:
        for batch in ds.iter_batches(batch_size=None):
            statuses += [str(s) for s in batch["status"]]
            progress.update(len(statuses))
            watchdog.beat()
    if len(statuses) != len(listed):
        raise RuntimeError(f"ingest accounted for {len(statuses)} of {len(listed)} files")
    summary = finish(dst, listed, labels, time.perf_counter() - start, before=len(raw), root=storage.listing_root(src))
    summary["ray_data_stats"] = ds.stats()
    return summary


def finish(dst: str, listed: list[str], labels: str, seconds: float, before: int, root: str) -> dict:
    """Build the final tables from every recorded raw row; `root` is the archive's folder (photos
    directly in it have no folder label)."""
    import pyarrow as pa

    raw = tables.read_raw(dst)
    images = tables.final_images(raw, listed)
    faces = tables.face_rows(images, labels, root)
    tables.write_table(storage.join(dst, tables.IMAGES), pa.Table.from_pylist(images))
    tables.write_table(storage.join(dst, tables.FACES), pa.Table.from_pylist(faces, schema=tables.FACE_SCHEMA))
    summary = tables.summarize(images, faces, seconds, max(0, len(raw) - before), labels)
    storage.write_bytes(storage.join(dst, tables.SUMMARY), json.dumps(summary, indent=2).encode())
    return summary
