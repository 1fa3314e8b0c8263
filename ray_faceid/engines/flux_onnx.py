"""FLUX's transformer as an ONNX graph, identity adapter installed, and ONNX Runtime running it.

The graph takes the transformer's inputs and the identity inputs by position (tokens, strength and
patches of MAX_IDENTITIES people a row; with a personal bank, each (row, person)'s bank slot), so
another person, person count or region runs on the same graph. Its batch is dynamic; the latent size
is fixed: one graph per image size. The adapter's weights are in the graph (its engine key names
their hash); a personal bank's stacks are graph inputs as well, fed from the bank at every call, so a
person's own adapter loaded after the export runs on it too. The graph holds none of the bank's
contents: it is exported with the stacks zeroed and they are required inputs without data, so no
person's own adapter is written into the engine cache (erasing a person leaves nothing of theirs
there). Graphs over 2 GB (FLUX.1 is 12B parameters) are written with external data.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ray_faceid import quiet
from ray_faceid.engines.onnx_export import OPSET
from ray_faceid.engines.onnxruntime_engine import onnxruntime_session
from ray_faceid.errors import BackendUnavailable

MAX_BATCH = 1024  # the graph's symbolic batch: any a call gives
EXTERNAL_DATA_BYTES = 1.8 * 2**30  # graphs past this write their weights apart (protobuf's limit is 2 GB)


class FluxCall(torch.nn.Module):
    """The transformer (identity adapter installed on it) as a function of tensors given by position:
    what is exported. The adapter and bank are registered so their weights keep their names."""

    def __init__(self, transformer, adapter=None, bank=None):
        super().__init__()
        self.transformer, self.adapter, self.bank = transformer, adapter, bank

    def forward(self, hidden_states, timestep, pooled_projections, encoder_hidden_states, txt_ids, img_ids,
                guidance=None, identity_tokens=None, identity_scale=None, patch_owner=None, personal_slots=None):
        identity = None
        if identity_tokens is not None:
            identity = {"identity_tokens": identity_tokens, "identity_scale": identity_scale,
                        "patch_owner": patch_owner}
            if personal_slots is not None:
                identity["personal_slots"] = personal_slots
        return self.transformer(hidden_states=hidden_states, timestep=timestep, guidance=guidance,
                                pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                                txt_ids=txt_ids, img_ids=img_ids, joint_attention_kwargs=identity,
                                return_dict=False)[0]


def bank_names(bank) -> list[str]:
    """The personal bank's stacks as the graph names them (inputs, fed at every call)."""
    return [] if bank is None else [f"bank.{name}" for name, _ in bank.named_buffers()]


def export_flux_transformer(call: FluxCall, example: dict[str, torch.Tensor], path: str | Path) -> Path:
    """`call` exported with `example` (FluxCall's keywords the generator gives; a batch of 2 or more:
    its batch dimension stays symbolic), checked with onnx.checker."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter's dependency)
    except ImportError as exc:
        raise BackendUnavailable("ONNX export needs the onnx extra: pip install 'ray_faceid[onnx]'") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # Positions (txt_ids, img_ids) are per size, not per row.
    dynamic = {name: None if name.endswith("_ids") else {0: batch} for name in example}
    # Weights and buffers (a bank's stacks too) past protobuf's 2 GB go to external data.
    large = sum(t.numel() * t.element_size() for t in (*call.parameters(), *call.buffers())) > EXTERNAL_DATA_BYTES
    with torch.no_grad(), quiet.onnx_export(), _zeroed(call.bank):
        torch.onnx.export(call.eval(), (), str(path), kwargs=example, input_names=list(example),
                          output_names=["velocity"], dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True,
                          external_data=large, verbose=False, optimize=False)
    if call.bank is not None:
        _required_inputs(path, set(bank_names(call.bank)))
    onnx.checker.check_model(str(path))
    return path


@contextmanager
def _zeroed(bank):
    """The bank's stacks swapped for zeros while the graph is traced (its people stay out of the file)."""
    if bank is None:
        yield
        return
    held = dict(bank.named_buffers())
    try:
        for name, buffer in held.items():
            setattr(bank, name, torch.zeros_like(buffer))
        yield
    finally:
        for name, buffer in held.items():
            setattr(bank, name, buffer)


def _required_inputs(path: Path, names: set[str]) -> None:
    """Initializers `names` turned into graph inputs without data (a call must give them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # external data files stay as they are
    tensors = {t.name: t for t in model.graph.initializer if t.name in names}
    if set(tensors) != names:
        raise BackendUnavailable(f"the exported graph lost the names of the bank's stacks {sorted(names - set(tensors))}")
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for name in sorted(names):
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, tensors[name].data_type,
                                                                   list(tensors[name].dims)))
    onnx.save(model, str(path))


class OnnxRuntimeFluxTransformer:
    """An exported graph called as FluxGenerator calls the transformer (keywords, identity in
    `joint_attention_kwargs`), returning (velocity,). ONNX Runtime on CPU runs fp32."""

    def __init__(self, path: str | Path, bank=None, threads: int = 0):
        if bank is not None:
            self._refuse_stored_bank(path)
        self.session = onnxruntime_session(path, threads, quiet=True)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.bank = bank
        self._bank_arrays: tuple | None = None  # (the bank's state, its stacks as arrays): copied when it changes

    @staticmethod
    def _refuse_stored_bank(path: str | Path) -> None:
        """A graph that holds a bank's contents as initializers (an older export) would run on them, not on
        the bank's people now. ONNX Runtime lists only initializers that are also inputs: read the graph."""
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        stored = [t.name for t in model.graph.initializer if t.name.startswith("bank.")]
        if stored:
            raise BackendUnavailable(f"{path} holds the personal bank's contents ({stored[0]}, ...): an older export; "
                                     "delete it from the engine cache to export it again")

    def __call__(self, hidden_states, timestep, pooled_projections, encoder_hidden_states, txt_ids, img_ids,
                 guidance=None, joint_attention_kwargs=None, return_dict=False):
        given = dict(hidden_states=hidden_states, timestep=timestep, pooled_projections=pooled_projections,
                     encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids, img_ids=img_ids, guidance=guidance,
                     **(joint_attention_kwargs or {}))
        given = {name: _numpy(value) for name, value in given.items() if value is not None}
        if self.bank is not None:  # what is loaded now: a person's own adapter loaded after the export too
            given.update(self._bank())
        missing = [name for name in self.inputs if name not in given]
        if missing:
            raise BackendUnavailable(f"this FLUX graph takes {missing}, which the generator did not give: it was "
                                     "exported for another kind of call; rebuild it")
        feed = {name: given[name] for name in self.inputs}
        (out,) = self.session.run(["velocity"], feed)
        return (torch.from_numpy(out).to(hidden_states.device, hidden_states.dtype),)


    def _bank(self) -> dict[str, np.ndarray]:
        """The bank's stacks as arrays, converted again only when its people changed (on a GPU each
        conversion is a copy of every stack to the host)."""
        state = self.bank.state
        if self._bank_arrays is None or self._bank_arrays[0] != state:
            self._bank_arrays = (state, {f"bank.{name}": _numpy(b) for name, b in self.bank.named_buffers()})
        return self._bank_arrays[1]


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bool:
        return tensor.detach().cpu().numpy()
    if tensor.is_floating_point():
        return tensor.detach().cpu().float().numpy()
    return tensor.detach().cpu().numpy()

