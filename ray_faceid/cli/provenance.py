"""`ray-faceid provenance IMAGE...`: what made each image, read from the record every image we write
carries (pipelines/provenance.py): the base model's and adapter's weights hashes, the encoders, the
people (registry ids), the seed and settings; `--json` gives the whole record."""
from __future__ import annotations

import typer

from ray_faceid.cli.common import EXIT_BAD_INPUT, console, err_console, print_json


def provenance(
    images: list[str] = typer.Argument(..., help="Images ray_faceid made (paths or URIs)."),
    as_json: bool = typer.Option(False, "--json", help="The whole record of each image, as JSON."),
):
    """What made each image: base model and adapter (weights hashes), encoders, people, seed and settings."""
    records, unreadable = {}, 0
    for uri in images:
        record, why = _record_of(uri)
        if record is None:
            err_console.print(f"{uri}: {why}", markup=False, highlight=False)
            unreadable += 1
        else:
            records[uri] = record
    if as_json:
        print_json(records)
    else:
        for uri, record in records.items():
            console.print(summary_table(uri, record))
    if unreadable:
        raise typer.Exit(EXIT_BAD_INPUT)


def _record_of(uri: str) -> tuple[dict | None, str | None]:
    """(the image's record, None), or (None, why there is none) in words a user acts on."""
    import io

    from PIL import Image

    from ray_faceid import storage
    from ray_faceid.errors import NotFound, StorageError
    from ray_faceid.pipelines.provenance import read_provenance

    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, NotFound):
        return None, "no such file"
    except StorageError as exc:
        if isinstance(exc.__cause__, IsADirectoryError):
            return None, "a folder: give the images in it (e.g. FOLDER/*.png)"
        return None, exc.message
    try:
        kind = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - Pillow raises many types for what is not an image
        return None, "not an image"
    if kind != "PNG":
        return None, (f"a {kind}: ray_faceid records what made an image only in the PNGs it writes (a copy "
                      f"converted to {kind} loses the record: read the PNG)")
    try:
        record = read_provenance(data)
    except Exception:  # noqa: BLE001 - a cut-off file, or a record that is not JSON
        return None, "a damaged PNG: its pixels or its ray_faceid record cannot be read"
    return (record, None) if record is not None else (
        None, "no ray_faceid record: not made by ray_faceid, or its metadata was stripped")


def summary_table(uri: str, record: dict):
    """The record's lines a person auditing an image asks for first."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(uri), show_header=False, title_justify="left")  # Text: a prompt's [brackets] as written
    published = record.get("adapter_published") or {}
    rows = [
        ("made by", f"{record.get('generator', '?')} {record.get('kind', '')}".strip()
                    + (f" (render row {record['render_row']})" if record.get("render_row") else "")),
        ("base model", f"{record.get('base_model')} ({record.get('base_family', 'unet')}"
                       f"{', ' + record['flux_variant'] if record.get('flux_variant') else ''}), "
                       f"weights {str(record.get('base_model_hash'))[:16]}"
                       f"{' UNTRAINED (a smoke-test base)' if record.get('untrained_base') else ''}"),
        ("adapter", (f"{published.get('kind')} {published.get('file')} (sha256 {str(published.get('sha256'))[:16]})"
                     if published else f"weights {str(record.get('adapter'))[:16]}" if record.get("adapter") else
                     "none") + (" UNTRAINED (seeded, no training step: identity not preserved)"
                                if record.get("adapter_trained_steps") == 0 and not published else "")),
        ("image encoder", str(record.get("image_encoder", "none"))[:16]),
        ("adapter's face encoder", record.get("encoder") or "none"),
        ("identities", "; ".join(_person(p) for p in record.get("identities", [])) or "none"),
        ("prompt", record.get("prompt", "")),
        ("seed / steps / guidance", f"{record.get('seed')} / {record.get('steps')} / {record.get('guidance')}"),
        ("size", "x".join(str(side) for side in record.get("size", [])) or "?"),
        ("runtime", " ".join(str(record[k]) for k in ("backend", "compiler", "precision") if record.get(k))
         + (f", {record['transformer_weights']} transformer weights" if record.get("transformer_weights") else "")),
    ]
    for key in ("negative_prompt", "true_cfg", "true_cfg_from_step", "identity_start", "feather", "repainted_at"):
        if record.get(key) not in (None, ""):
            rows.append((key.replace("_", " "), str(record[key])))
    if isinstance(record.get("step_cache"), dict):
        cache = record["step_cache"]
        rows.append(("step cache", f"threshold {cache.get('threshold'):g}, {cache.get('steps_reused')} of "
                                   f"{record.get('steps')} steps reused"))
    for name, value in rows:
        table.add_row(Text(name), Text(str(value)))
    return table


def _person(person: dict) -> str:
    said = f"{person.get('name')} (id {person.get('id')})" if person.get("id") else str(person.get("name"))
    extras = []
    if person.get("scale", 1.0) != 1.0:
        extras.append(f"strength {person['scale']}")
    if person.get("region"):
        extras.append(f"region {person['region']}")
    if person.get("embeddings_encoder"):
        extras.append(f"encoder {person['embeddings_encoder']}")
    if person.get("personal_adapter"):
        extras.append(f"personal adapter {person['personal_adapter']}")
    return said + (f", {', '.join(extras)}" if extras else "")
