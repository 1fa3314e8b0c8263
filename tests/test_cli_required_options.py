"""A required option the user left out is named with where its value comes from, not only click's
`Missing option`."""
import typer
from typer.testing import CliRunner

from ray_faceid.cli import app


def commands(group, prefix=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_required_option_has_help_saying_what_it_takes():
    found = [(path, p) for path, command in commands(typer.main.get_command(app)) for p in command.params
             if p.param_type_name == "option" and p.required]
    assert len(found) >= 10  # the walk sees the commands' options
    assert not [f"{' '.join(path)} {p.opts[0]}" for path, p in found if not p.help]


def test_personalize_without_an_adapter_says_where_one_comes_from(tmp_path):
    result = CliRunner().invoke(app, ["personalize", "--registry", str(tmp_path / "registry")])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "Missing option '--adapter'" in said and "ray-faceid train" in said
