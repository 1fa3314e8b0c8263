"""`ray-faceid identities enroll|list|show|delete`: the identity registry from the command line."""
from __future__ import annotations

import json

import typer

from ray_faceid.cli.common import console, print_json, user_errors

app = typer.Typer(help="The identity registry: enroll people from photos, list, show, delete.", no_args_is_help=True)
RegistryOpt = typer.Option("./faceid_registry", "--registry", help="Registry store: a folder or fsspec URI.")
TenantOpt = typer.Option("default", "--tenant", help="Tenant that owns the identities.")


@app.command()
def enroll(
    photos: list[str] = typer.Argument(..., help="1-10 photos of the person alone."),
    consent: str = typer.Option(..., "--consent", help="Reference to the person's recorded consent."),
    name: str = typer.Option("", "--name", help="The person's name, unique per tenant: generate --identity NAME, "
                             "catalogs and the API then find them by it."),
    name_exists: str = typer.Option("refuse", "--name-exists", help="When the name is taken: refuse | rename "
                                    "(adds a suffix) | replace (erases the identity holding it)."),
    registry: str = RegistryOpt,
    tenant: str = TenantOpt,
):
    """Enroll one person; prints the new id, and the reason for every rejected photo."""
    import numpy as np

    from ray_faceid.config import DetectionConfig, FaceConfig, ServeLimits
    from ray_faceid.enrollment import rejection
    from ray_faceid.errors import BadInput, FaceIdError
    from ray_faceid.face.align import align, loose_template
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.registry import REFERENCE_CROP, Registry

    with user_errors():
        limits = ServeLimits()
        if not 1 <= len(photos) <= limits.max_photos:
            raise BadInput(f"give between 1 and {limits.max_photos} photos, got {len(photos)}")
        analyzer = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all")))
        reports, embeddings, quality, crops = [], [], [], []
        for i, (path, found) in enumerate(zip(photos, analyzer.analyze_batch(photos, return_errors=True))):
            faces = [] if isinstance(found, FaceIdError) else found
            reason = found.message if isinstance(found, FaceIdError) else rejection([f.to_dict() for f in faces], limits)
            reports.append({"index": i, "filename": path, "accepted": reason is None, "reason": reason})
            if reason is None:
                embeddings.append(faces[0].embedding)
                quality.append(faces[0].quality["score"])
                crops.append(align(analyzer.load(path), faces[0].landmarks, loose_template(REFERENCE_CROP))[0])
            else:
                typer.echo(f"rejected {path}: {reason}")
        if not embeddings:
            raise BadInput("no usable photo: " + "; ".join(f"{r['filename']}: {r['reason']}" for r in reports))
        meta = Registry(registry).create(tenant, name, consent, np.stack(embeddings), np.array(quality), analyzer.spec,
                                         crops, reports, name_exists=name_exists)
    called = f" as {meta['name']!r}" if meta["name"] else ""
    typer.echo(f"enrolled {meta['id']}{called} ({meta['faces_used']} of {len(photos)} photos used)")


@app.command("enroll-dataset")
def enroll_dataset(
    dataset: str = typer.Argument(..., help="An ingest output (after `ray-faceid pairs`)."),
    consent: str = typer.Option(..., "--consent", help="Reference to the consent / licence covering the dataset's people."),
    registry: str = RegistryOpt,
    tenant: str = TenantOpt,
):
    """Enroll every identity of an ingest output from its best faces (re-runs skip those enrolled)."""
    from ray_faceid.enrollment import enroll_dataset as enroll_all
    from ray_faceid.registry import Registry

    with user_errors():
        result = enroll_all(Registry(registry), tenant, dataset, consent)
    for label, identity in result["enrolled"].items():
        typer.echo(f"enrolled {label}: {identity}")
    for label, reason in result["skipped"].items():
        typer.echo(f"skipped {label}: {reason}")


@app.command("list")
def list_identities(registry: str = RegistryOpt, tenant: str = TenantOpt, as_json: bool = typer.Option(False, "--json")):
    """Identities of a tenant (metadata only)."""
    from ray_faceid.registry import Registry

    with user_errors():
        rows = Registry(registry).require().list(tenant)
    if as_json:
        print_json(rows)
        return
    for meta in rows:
        console.print(f"{meta['id']}  {meta['name'] or '-'}  faces={meta['faces_used']}  created={meta['created']}")


@app.command()
def show(identity: str = typer.Argument(..., help="An id or a name."), registry: str = RegistryOpt,
         tenant: str = TenantOpt):
    """One identity's metadata as JSON."""
    from ray_faceid.registry import Registry

    with user_errors():
        store = Registry(registry).require()
        console.print_json(json.dumps(store.get(tenant, store.resolve(tenant, identity))))


@app.command()
def delete(identity: str = typer.Argument(..., help="An id or a name."), registry: str = RegistryOpt,
           tenant: str = TenantOpt):
    """Erase every artifact of an identity: references, embeddings, adapters, metadata."""
    from ray_faceid.registry import Registry

    with user_errors():
        store = Registry(registry).require()
        found = store.resolve(tenant, identity)
        store.delete(tenant, found)
    console.print(f"deleted {found}" + (f" ({identity})" if found != identity else ""))
