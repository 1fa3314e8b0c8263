"""Root of the `ray-faceid` command; each job registers its sub-command here."""
from __future__ import annotations

import typer

from ray_faceid.cli import (
    compile,
    data,
    demo,
    eval_edits,
    faces,
    generate,
    identities,
    merge_lora,
    provenance,
    render,
    serve,
    stand_ins,
    train,
)

app = typer.Typer(
    name="ray-faceid",
    help="Identity-preserving face customization on Ray: analyze faces, ingest, train, serve, render.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(show_all: bool = typer.Option(False, "--verbose", help="Show Ray's own logs and the messages ray_faceid "
                                       "filters as harmless (listed in ray_faceid/quiet.py).")):
    """Identity-preserving face customization on Ray."""
    import os

    from ray_faceid.quiet import VERBOSE_ENV

    if show_all:
        os.environ[VERBOSE_ENV] = "1"  # Ray worker processes inherit it too


app.add_typer(faces.app, name="faces")
app.add_typer(identities.app, name="identities")
app.command("demo")(demo.demo)
app.command("generate")(generate.generate)
app.command("inpaint")(generate.inpaint)
app.command("ingest")(data.ingest)
app.command("pairs")(data.pairs)
app.command("serve")(serve.serve)
app.command("train")(train.train)
app.command("personalize")(train.personalize)
app.command("render")(render.render)
app.command("eval")(render.evaluate)
app.command("eval-edits")(eval_edits.eval_edits)
app.command("provenance")(provenance.provenance)
app.command("compile")(compile.compile_engine)
app.command("merge-lora")(merge_lora.merge_lora)
app.command("stand-ins")(stand_ins.stand_ins)
