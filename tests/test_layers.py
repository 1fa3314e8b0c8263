"""The layers, from the faces down to the face stack (README, Architecture): a module imports from
its own layer or the ones below it, never above, and no face imports another face. Read from the
source (every import, those inside functions included), so the rule holds for lazy imports too."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Top to bottom. A module belongs to the layer of its longest matching prefix.
LAYERS = [
    ("entry points", ("ray_faceid.cli", "ray_faceid.__main__", "deployments.app", "deployments.local")),
    ("faces", ("deployments.ingress", "deployments.web_page", "deployments.page_gate")),
    ("service", ("deployments",)),
    ("jobs", ("ray_faceid.data", "ray_faceid.train", "ray_faceid.eval", "ray_faceid.enrollment",
              "ray_faceid.erasure", "ray_faceid.secret_rotation")),
    ("models", ("ray_faceid.pipelines", "ray_faceid.identity")),
    ("records", ("ray_faceid.registry", "ray_faceid.registry_secret", "ray_faceid.tombstones",
                 "ray_faceid.quarantine", "ray_faceid.store_lock", "ray_faceid.face_sketch")),
    ("face stack", ("ray_faceid.face",)),
    # What one denoising or embedding call runs on; identity reaches it as data (context, routing, bank).
    ("engines", ("ray_faceid.engines", "ray_faceid.identity.context", "ray_faceid.identity.routing",
                 "ray_faceid.identity.personal_bank")),
    ("base", ("ray_faceid", "ray_faceid.engines.buckets")),
]
FACES = {"cli": ("ray_faceid.cli",), "http": ("deployments.ingress",),
         "page": ("deployments.web_page", "deployments.page_gate")}


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int:
    best = max(((len(p), k) for k, (_, prefixes) in enumerate(LAYERS) for p in prefixes if _matches(module, p)),
               default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and to the README"
    return best[1]


def face_of(module: str) -> str | None:
    return next((f for f, prefixes in FACES.items() if any(_matches(module, p) for p in prefixes)), None)


def imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import of the project's own modules."""
    found = []
    for package in ("ray_faceid", "deployments"):
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # `from deployments import web_page` imports the module deployments.web_page
                    names = [f"{node.module}.{a.name}" if node.module in ("ray_faceid", "deployments") else node.module
                             for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                found += [(module, n, node.lineno) for n in names if n.split(".")[0] in ("ray_faceid", "deployments")]
    return found


def upward(found: list[tuple[str, str, int]]) -> list[str]:
    return [f"{a}:{line} imports {b} ({LAYERS[layer_of(a)][0]} -> {LAYERS[layer_of(b)][0]})"
            for a, b, line in found if layer_of(b) < layer_of(a)]


def crossing(found: list[tuple[str, str, int]]) -> list[str]:
    return [f"{a}:{line} imports {b}" for a, b, line in found if face_of(a) and face_of(b) and face_of(a) != face_of(b)]


def test_no_module_imports_from_a_layer_above_its_own():
    assert not upward(imports()), "\n".join(upward(imports()))


def test_no_face_imports_another_and_the_page_sees_only_the_service():
    found = imports()
    assert not crossing(found), "\n".join(crossing(found))
    page = {b for a, b, _ in found if face_of(a) == "page" and b.startswith("deployments.")}
    assert page <= {"deployments.service", "deployments.page_gate", "deployments.schemas", "deployments.auth"}, page
    assert not any(r.level for p in ("ray_faceid", "deployments") for f in (ROOT / p).rglob("*.py")
                   for r in ast.walk(ast.parse(f.read_text())) if isinstance(r, ast.ImportFrom)), \
        "a relative import: this rule reads absolute ones only"


def test_the_rule_sees_a_violation():
    """The checker itself, on made-up imports: an upward one and a face importing a face are caught,
    a downward one is not; and it reads imports inside functions."""
    assert upward([("ray_faceid.face.align", "ray_faceid.pipelines.generate", 1)])
    assert upward([("deployments.service", "deployments.web_page", 1)])
    assert not upward([("ray_faceid.pipelines.generate", "ray_faceid.face.align", 1)])
    assert crossing([("deployments.web_page", "deployments.ingress", 1)])
    assert crossing([("ray_faceid.cli.serve", "deployments.web_page", 1)])
    assert not crossing([("deployments.web_page", "deployments.page_gate", 1)])
    found = {(a, b) for a, b, _ in imports()}
    assert ("deployments.web_page", "deployments.service") in found  # a module-level import
    assert ("ray_faceid.face.backends.dlib_backend", "ray_faceid.engines.face_encoder") in found  # one in a function


def kind_questions() -> list[str]:
    """Places outside identity/ that ask which kind an adapter is (`.options.mapper`, its published
    `per_photo` flag) instead of asking its kind (identity/kinds.py)."""
    found = []
    for package in ("ray_faceid", "deployments"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.is_relative_to(ROOT / "ray_faceid" / "identity"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                asks_mapper = (isinstance(node, ast.Attribute) and node.attr == "mapper"
                               and isinstance(node.value, ast.Attribute) and node.value.attr == "options")
                if asks_mapper or (isinstance(node, ast.Constant) and node.value == "per_photo"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_adapter_kinds_plug_in_without_the_pipeline_asking_which_it_is():
    assert not kind_questions(), "ask adapter.kind instead: " + ", ".join(kind_questions())
