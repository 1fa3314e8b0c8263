"""`ray-faceid render`: re-render a catalog on a Ray Data actor pool.

Rows are sorted by their identities, so a batch mostly needs identities its actor has already
loaded (each actor keeps embeddings and per-identity weights in an LRU). Each actor holds one
Renderer (base model, shared adapter, face stack) on its GPU where the cluster has GPUs. Every row
is committed on its own (PNG + sidecar record, content-addressed), so a killed job loses only
rows in flight, and a re-run renders only rows whose key has no output yet: new rows, changed
rows, and the rows of an identity whose adapter changed. At the end the driver writes
`manifest.parquet` (one record per catalog row, errors included) and `render_summary.json`.
"""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa

from ray_faceid import storage
from ray_faceid.config import RenderConfig
from ray_faceid.data import tables
from ray_faceid.data.catalog import read_catalog
from ray_faceid.errors import BadInput, FaceIdError
from ray_faceid.progress import ProgressLine, to_stderr
from ray_faceid.watchdog import Watchdog

MANIFEST, SUMMARY = "manifest.parquet", "render_summary.json"
MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()), ("index", pa.int64()), ("status", pa.string()), ("error", pa.string()),
    ("output_uri", pa.string()), ("key", pa.string()), ("seed", pa.int64()), ("cached", pa.bool_()),
    ("similarity", pa.float64()), ("face_found", pa.bool_()), ("leakage", pa.float64()), ("scores", pa.string()),
    ("provenance", pa.string()), ("identity_ids", pa.list_(pa.string())),
])


class RenderRows:
    """Map-batches UDF: one Renderer per actor."""

    def __init__(self, config_json: str, model: str, adapter: str | None, registry: str, tenant: str, out: str,
                 imr: str | None, flow: str | None, image_encoder: str | None, catalog: str,
                 people_counts: tuple[int, ...]):
        from ray_faceid.data.render_rows import Renderer

        if getattr(model, "family", None) == "flux":  # a FLUX base: its own pipeline (render_flux.py)
            from ray_faceid.data.render_flux import FluxRenderer as Renderer
        self.renderer = Renderer(RenderConfig.model_validate_json(config_json), model, adapter, registry, tenant, out,
                                 imr=imr, flow=flow, image_encoder=image_encoder, catalog=catalog,
                                 people_counts=people_counts)

    def __call__(self, batch: dict) -> dict:
        records = self.renderer.render_batch([str(t) for t in batch["row"]], [int(i) for i in batch["index"]])
        return {"record": np.array([json.dumps(r) for r in records])}


def _identity_order(text: str) -> tuple:
    try:
        ids = json.loads(text).get("identities") or []
        return tuple(sorted(i if isinstance(i, str) else str(i.get("id") or i.get("name")) for i in ids))
    except (ValueError, AttributeError):
        return ()


def people_counts(texts: list[str]) -> tuple[int, ...]:
    """How many people the rows name, each count once (1 where none does): what a render actor warms."""
    from ray_faceid.pipelines.generate import MAX_IDENTITIES

    counts = set()
    for text in texts:
        try:
            named = json.loads(text).get("identities")
        except (ValueError, AttributeError):  # the row's own error, when it is rendered
            continue
        if isinstance(named, list) and 1 <= len(named) <= MAX_IDENTITIES:
            counts.add(len(named))
    return tuple(sorted(counts)) or (1,)


def _row_name(text: str, index: int) -> str:
    try:
        return str(json.loads(text).get("id") or f"#{index}")
    except (ValueError, AttributeError):
        return f"#{index}"


def _readable(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def summarize(records: list[dict], seconds: float, texts: list[str] | None = None) -> dict:
    """Counts and figures of a run; `unreadable` counts rows that are not a JSON object at all."""
    ok = [r for r in records if r["status"] == "ok"]
    rendered = [r for r in ok if not r["cached"]]
    sims = np.array([r["similarity"] for r in ok if r["similarity"] is not None])
    with_identity = [r for r in ok if r["scores"] and json.loads(r["scores"])["identities"]]
    leak = [r["leakage"] for r in ok if r["leakage"] is not None]
    return {
        "rows": len(records), "rendered": len(rendered), "cached": len(ok) - len(rendered),
        "failed": len(records) - len(ok), "unreadable": sum(not _readable(t) for t in texts or []),
        "seconds": round(seconds, 2),
        "rows_per_s": round(len(rendered) / seconds, 3) if seconds > 0 else None,
        "similarity_mean": round(float(sims.mean()), 4) if sims.size else None,
        "similarity_p10": round(float(np.percentile(sims, 10)), 4) if sims.size else None,
        "detection_rate": (round(sum(bool(r["face_found"]) for r in with_identity) / len(with_identity), 4)
                           if with_identity else None),
        "leakage_max": round(float(max(leak)), 4) if leak else None,
        "errors": {r["id"]: r["error"] for r in records if r["status"] != "ok"},
    }


def run_inputs(texts: list[str], model: str, registry: str, adapter: str | None, config: RenderConfig, tenant: str,
               imr: str | None, flow: str | None, image_encoder: str | None = None, catalog: str | None = None) -> str:
    """A fingerprint of everything a run's images depend on, read without loading a model or
    starting Ray: the catalog rows, the base's files, the adapter's, IMR's, flow's, image encoder's and
    IdentityNet's bytes, the settings, and the registry records of every identity the rows name (a new
    enrollment, erasure or personal adapter changes it)."""
    from ray_faceid.pipelines.model_ref import resolve_model
    from ray_faceid.registry import Registry

    h = hashlib.sha256(json.dumps({"rows": texts, "model": resolve_model(model, flux=True).fingerprint(),
                                   "settings": config.compute_hash(),
                                   "tenant": tenant}, sort_keys=True).encode())
    with_identitynet = [config.identitynet] if config.identitynet else []  # (unset: the hash runs before it had)
    for uri in [adapter, imr, flow, image_encoder, *with_identitynet]:
        h.update(b"\0")
        try:
            h.update(storage.tree_hash(uri).encode() if uri else b"")
        except FaceIdError as exc:  # the run itself says what is wrong with it
            h.update(exc.code.encode())
    if config.identitynet:
        h.update(f"identitynet scale {config.identitynet_scale}".encode())
    if config.flux_step_cache:
        h.update(f"flux step cache {config.flux_step_cache}".encode())
    if config.flux_transformer_weights != "same":
        h.update(f"flux transformer weights {config.flux_transformer_weights}".encode())
    if (config.precision, config.device) != ("auto", "auto"):  # keyed per row once resolved (Renderer.key)
        h.update(f"precision {config.precision} on {config.device}".encode())
    store, named = Registry(registry), set()
    for text in texts:
        try:
            row = json.loads(text)
            named |= {i if isinstance(i, str) else str(i.get("id")) for i in row.get("identities") or []}
        except (ValueError, AttributeError):
            continue
        for field in ("image", "mask"):  # an inpaint row's photo or mask may change under the same name
            if isinstance(row.get(field), str):
                try:
                    where = storage.beside(catalog, row[field]) if catalog else row[field]
                    h.update(hashlib.sha256(storage.read_bytes(where)).digest())
                except FaceIdError:
                    h.update(b"unreadable")
    for reference in sorted(named):
        try:
            meta = store.get(tenant, store.resolve(tenant, reference))
            h.update(json.dumps([meta["id"], meta.get("generation"), meta.get("updated"), meta.get("adapters")],
                                sort_keys=True, default=str).encode())
        except FaceIdError as exc:
            h.update(f"{reference}: {exc.code}".encode())
    return h.hexdigest()


def _finished(out: str, inputs: str) -> dict | None:
    """The last run's summary if it rendered every row of these very inputs and its images are all
    there: nothing to do, and no cluster to start for it."""
    try:
        summary = json.loads(storage.read_bytes(storage.join(out, SUMMARY)))
        records = tables.read_table(storage.join(out, MANIFEST)).to_pylist()
    except (FaceIdError, ValueError):
        return None
    if summary.get("inputs") != inputs or summary.get("failed") or len(records) != summary.get("rows"):
        return None
    if not all(r["status"] == "ok" and r["output_uri"] and storage.exists(r["output_uri"]) for r in records):
        return None
    return summary


def run_render(catalog: str, out: str, model: str, registry: str, adapter: str | None = None,
               config: RenderConfig | None = None, tenant: str = "default", address: str | None = None,
               imr: str | None = None, flow: str | None = None, image_encoder: str | None = None) -> dict:
    """Render every catalog row that has no output for its current key; returns the summary.
    `imr` and `flow` (URIs) serve the rows' expressions and attribute edits; `image_encoder` (a
    folder) is the CLIP image encoder a FaceID-Plus adapter reads people's reference crops through."""
    import ray

    from ray_faceid.data.cluster import cluster_gpus, free_workers, init_ray
    from ray_faceid.pipelines.model_ref import resolve_model

    config = config or RenderConfig()
    # The actors may run in another working directory (a cluster started elsewhere): paths from here.
    out, registry, adapter, imr, flow, image_encoder, catalog = map(
        storage.absolute, (out, registry, adapter, imr, flow, image_encoder, catalog))
    face = config.face.model_copy(update={"insightface_root": storage.absolute(config.face.insightface_root),
                                          "recognizer_onnx": storage.absolute(config.face.recognizer_onnx)})
    config = config.model_copy(update={"identitynet": storage.absolute(config.identitynet), "face": face})
    started = time.perf_counter()
    texts = read_catalog(catalog)
    if not texts:
        raise BadInput(f"catalog {catalog} has no rows")
    from ray_faceid.registry import Registry

    model = resolve_model(model, flux=True)  # once: the fingerprint and every actor take the reference
    if config.size:  # the job's own size: one line here, not every row's error after Ray starts
        from ray_faceid.pipelines.generate import parse_size

        parse_size(config.size)
    if model.family == "flux":
        from ray_faceid.data.render_flux import check_flux_job

        check_flux_job(config, imr, flow, model)
        named = [_row_name(t, k) for k, t in enumerate(texts) if _identity_order(t)]
        if not adapter and named:
            shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
            raise BadInput(f"{len(named)} row{'s name' if len(named) > 1 else ' names'} people ({shown}): identity on "
                           "FLUX reads a FLUX IP-Adapter or PuLID-FLUX file; give --adapter FILE (rows of prompts alone "
                           "render without it)")
    elif config.flux_step_cache:
        raise BadInput(f"--step-cache is for FLUX bases; {model.name} is a UNet family")
    else:
        from ray_faceid.pipelines.flux_memory import refuse_on_unet

        refuse_on_unet(config.flux_text_encoders, config.flux_transformer_weights, model.name)
    if model.family == "flux" and adapter:
        from ray_faceid.identity.pulid_flux import RENDER_READERS, is_pulid_file

        if is_pulid_file(adapter) and (not image_encoder or (config.face.backend == "dlib"
                                                             and not config.face.recognizer_onnx)):
            raise BadInput(RENDER_READERS)  # before Ray: each row's people are read by its encoders
        if is_pulid_file(adapter):  # its file, encoders and face stack, before any actor loads them
            from ray_faceid.identity.pulid_faces import check_encoder_folder, check_face_stack
            from ray_faceid.identity.pulid_flux import check_pulid_file
            from ray_faceid.pipelines.flux import flux_settings

            check_face_stack(config.face)
            check_encoder_folder(image_encoder)
            check_pulid_file(adapter, flux_settings(model)["inner_width"])
    Registry(registry).record_output(tenant, out)  # before any image: erasing a person reaches this folder
    inputs = run_inputs(texts, model, registry, adapter, config, tenant, imr, flow, image_encoder, catalog)
    done = _finished(out, inputs)
    if done is not None:  # every row is rendered for these inputs: no cluster, no model
        seconds = round(time.perf_counter() - started, 2)
        return dict(done, rendered=0, cached=done["rows"], seconds=seconds, rows_per_s=None)  # no rate: nothing rendered
    init_ray(address)
    gpus = config.num_gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster_gpus() > 0 else 0.0
    workers = config.workers or (free_workers(True) if gpus else 1)
    rows = sorted(({"row": t, "index": i} for i, t in enumerate(texts)), key=lambda r: (_identity_order(r["row"]), r["index"]))
    blocks = max(1, -(-len(rows) // config.batch_size))
    workers = min(workers, blocks)  # an actor without a block would load the models for nothing
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        RenderRows,
        fn_constructor_args=(config.model_dump_json(), model, adapter, registry, tenant, out, imr, flow, image_encoder,
                             catalog, people_counts(texts)),
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=0.5 if gpus else 1,
        num_gpus=gpus,
    )
    records, progress = [], ProgressLine("render rows", len(texts), emit=to_stderr)
    with Watchdog("render", config.stall_warn_s, config.stall_fail_s) as watchdog:
        for batch in ds.iter_batches(batch_size=None):
            records += [json.loads(str(r)) for r in batch["record"]]
            progress.update(len(records), failed=sum(r["status"] != "ok" for r in records))
            watchdog.beat()
    records.sort(key=lambda r: r["index"])
    if len(records) != len(texts):
        raise RuntimeError(f"render accounted for {len(records)} of {len(texts)} rows")
    tables.write_table(storage.join(out, MANIFEST), pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA))
    summary = dict(summarize(records, time.perf_counter() - started, texts), inputs=inputs)
    storage.write_bytes(storage.join(out, SUMMARY), json.dumps(summary, indent=2).encode())
    return summary
