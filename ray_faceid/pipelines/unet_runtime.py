"""What runs IdentityPipeline's UNet calls (generate.py): eager torch, the torch.compile engine, or
an ONNX Runtime / TensorRT engine from the engine cache; how rows are batched for them (people's own
adapters as per-row weights), the engines' shapes, warm-up, and dropping an erased person's weights."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ray_faceid.engines.base import DTYPES, UNetCall
from ray_faceid.engines.buckets import MAX_ENGINES, engine_bucket, engine_buckets
from ray_faceid.errors import BadInput, Erased
from ray_faceid.identity.personal_bank import PersonalRows
from ray_faceid.pipelines.text_conditioning import TextConditioning, unet_conditioning

if TYPE_CHECKING:
    from ray_faceid.pipelines.generate import GenerationItem


class UNetRuntime:
    """Mixed into IdentityPipeline: it provides base, adapter, backend, device, the personal bank,
    the engine cache and the engines it keeps."""

    @property
    def per_row_weights(self) -> bool:
        """Whether one UNet batch may mix people's own adapters (the torch engines read them per row;
        ONNX Runtime and TensorRT engines hold one set of weights)."""
        return self.backend in ("torch", "torch.compile")

    def unet_batches(self, items: list["GenerationItem"]) -> list[list[int]]:
        """Indices of the items that share one UNet batch, in order: at most the bank's slots of
        people with their own adapter per batch (torch engines), or one adapter per batch (others);
        with FaceID-Portrait, only items whose people have as many photos (as many tokens)."""
        if self.adapter is None:  # no identity, no adapters of their own
            return [list(range(len(items)))]
        batches: list[list[int]] = []
        people: list[set] = []
        shapes: list[tuple] = []
        for k, item in enumerate(items):
            own = self.personal_of(item)
            key = own[0] if own else None  # the version: a content hash of the person's weights
            shape = self.adapter.kind.token_counts(item.identities)
            for batch, held, tokens in zip(batches, people, shapes):
                fits = (key in held or key is None or len(held - {None}) < self.personal_bank.slots
                        if self.per_row_weights else held == {key})
                if fits and tokens == shape:
                    batch.append(k)
                    held.add(key)
                    break
            else:
                batches.append([k])
                people.append({key})
                shapes.append(shape)
        return batches

    def _text_inputs(self, text: TextConditioning, h: int, w: int) -> dict:
        f = self.base.vae_scale_factor
        return unet_conditioning(self.base, text, w * f, h * f)

    def _unet_call(self, sample, t, text, kwargs, h, w, row_personal, control=None):
        """Eager torch, or the configured engine with identity as its inputs. Each row's own adapter
        (`row_personal`: (version, delta) or None) is placed in the bank at every call: a job that
        ran in between may have loaded others."""
        personal_rows = self.personal_bank.rows(row_personal) if kwargs and any(row_personal) else None
        if self.backend == "torch":
            if personal_rows is not None:
                kwargs = dict(kwargs, personal=PersonalRows(self.personal_bank, personal_rows))
            inputs = self._text_inputs(text, h, w)
            if control is not None:  # InstantID: IdentityNet's residuals, from the tokens and the keypoints
                down, mid = self.adapter.identitynet.residuals(sample, t, *control, inputs.get("added_cond_kwargs"))
                inputs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            return self.base.unet(sample, t, **inputs, cross_attention_kwargs=kwargs or None).sample
        rows, opts = sample.shape[0], self.adapter.options
        if kwargs:
            tokens, scale, region = kwargs["identity_tokens"], kwargs["identity_scale"], kwargs["region_masks"]
        else:  # no identity: one zero identity at scale 0 is exactly the stock layer
            tokens = torch.zeros(rows, 1, opts.num_tokens, self.base.cross_attention_dim, device=self.device,
                                 dtype=sample.dtype)
            scale, region = torch.zeros(rows, 1, device=self.device, dtype=sample.dtype), None
        if region is None:
            region = torch.ones(rows, tokens.shape[1], h, w, device=self.device, dtype=sample.dtype)
        added = {}
        if self.base.family == "sdxl":  # the added conditioning: live inputs like the rest
            cond = self._text_inputs(text, h, w)["added_cond_kwargs"]
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        text = text.hidden
        if self.backend == "torch.compile":
            # One engine for every shape: a compiled graph per bucket; the bank slots are an input.
            # InstantID: IdentityNet runs in the same graph, from the tokens and each row's keypoint image.
            control_image = None if control is None else control[1]
            engine = self.compiled_engine()
            out = engine(sample, t, text, tokens, scale, region, personal_rows, **added, control_image=control_image,
                         compile_new=self.compile_new_shapes)
            if out is not None:
                return out
            # An unwarmed shape runs eager: the very function the engine compiles, uncompiled.
            return UNetCall(self.base.unet, self.personal_bank, engine.identitynet)(
                sample, t, text, tokens, scale, region, personal_rows=personal_rows, **added, control_image=control_image)
        versions = {p[0]: p for p in row_personal if p}
        if len(versions) > 1:
            raise BadInput("images generated together on this backend must use the same person's own adapter")
        engine = self._engine(rows, tokens.shape[1], h, w, text.shape[1], next(iter(versions.values()), None),
                              control is not None, tokens.shape[2])
        if control is not None:  # InstantID: IdentityNet is in the exported graph, the keypoint image an input
            added["control_image"] = control[1]
        return engine(sample, t, text, tokens, scale, region, **added)

    def _engine(self, rows: int, identities: int, h: int, w: int, text_length: int, personal: tuple | None,
                control: bool = False, tokens: int | None = None):
        """An ONNX Runtime or TensorRT engine holding the shared weights plus `personal` (version,
        delta). Engines are kept per set of weights, never refitted while in use: a job paused
        between its steps (turns.py) comes back to the weights it started with. `control`: with
        InstantID's IdentityNet in the graph (a call without identity has none). `tokens`: per
        identity (default the adapter's; FaceID-Portrait gives 16 per photo: a graph per count)."""
        from ray_faceid.engines.base import EngineShape
        from ray_faceid.engines.select import processor_weights_by_onnx_name, unet_engine

        top = engine_bucket(self.backend, rows)
        version, delta = personal or (None, None)
        if version in self._refused:
            raise Erased("this person was erased: their own adapter is not served any more")
        tokens = tokens or self.adapter.options.num_tokens
        net = self.adapter.identitynet if control else None  # its weights and scale are in the graph
        key = (h, w, identities, top, net and (net.sha256, net.scale), tokens, version)
        with self._engines_lock:  # the erasure sweep may drop engines from another thread
            found = self.engines.pop(key, None)
        if found is not None:
            engine = found
        else:
            # One engine per bucket whatever the first call's rows (its key, and the file `compile`
            # builds ahead): tuned for one image with guidance, the most common call.
            shape = EngineShape(batch=(1, 2, top), latent=(h, w), identities=identities,
                                tokens=tokens, text_length=text_length,
                                channels=self.base.unet.config.in_channels, cross_dim=self.base.cross_attention_dim,
                                pooled_dim=self.base.pooled_dim, vae_factor=self.base.vae_scale_factor,
                                control=control)
            engine = unet_engine(self.base, self.adapter, shape, self.backend, self.precision, self.engine_cache)
            if delta:
                engine.refit(processor_weights_by_onnx_name(self.adapter, delta))  # a new engine: no one uses it yet
        with self._engines_lock:
            self.engines[key] = engine
            while len(self.engines) > MAX_ENGINES:  # least recently used first
                self.engines.pop(next(iter(self.engines)))
        return engine

    def forget_personal(self, version: str) -> None:
        """Drop every copy of an erased person's own adapter this pipeline holds (bank slot, engines)
        and refuse it from now on (a request of theirs still running fails, typed, at its next step)."""
        self._refused.add(version)
        if self.personal_bank is not None:
            self.personal_bank.evict(version, forever=True)
        with self._engines_lock:
            for key in [k for k in self.engines if k[-1] == version]:
                self.engines.pop(key)

    def compiled_engine(self):
        """The torch.compile engine; InstantID's IdentityNet (attached after the pipeline is made) is
        compiled into it, so it is made anew if that changed."""
        identitynet = self.adapter.identitynet if self.adapter is not None else None
        if self._compiled is None or self._compiled.identitynet is not identitynet:
            from ray_faceid.engines.compiled_engine import CompiledUNetEngine

            self._compiled = CompiledUNetEngine(self.base.unet, bank=self.personal_bank, identitynet=identitynet)
        return self._compiled

    def engine_shape(self, width: int, height: int, identities: int, max_images: int, photos: int = 1):
        """The EngineShape of this pipeline's UNet calls at one size: CFG doubles the rows. `photos`:
        FaceID-Portrait's photos per person (each its own tokens)."""
        from ray_faceid.engines.base import EngineShape

        self._check_size(width, height)
        f = self.base.vae_scale_factor
        return EngineShape(batch=(2, 2, 2 * max_images), latent=(height // f, width // f), identities=identities,
                           tokens=self.adapter.options.num_tokens * photos,
                           text_length=self.base.tokenizer.model_max_length,
                           channels=self.base.unet.config.in_channels, cross_dim=self.base.cross_attention_dim,
                           pooled_dim=self.base.pooled_dim, vae_factor=f,
                           control=self.adapter.identitynet is not None)

    @property
    def precision(self) -> str:
        """The UNet's precision name (fp32, fp16, bf16)."""
        return next(name for name, dtype in DTYPES.items() if dtype == self.base.unet.dtype)

    def warm_up(self, sizes: list[tuple[int, int]], identities: list[int], max_images: int,
                photos: list[int] = (1,)) -> dict:
        """Build every engine (size, identity count, batch bucket) the pipeline will run, from the
        engine cache where it is there and into it where not: the one builder behind `compile`, a
        Serve replica's start (render actors build the same keys as their rows need them).
        torch.compile: Inductor's artifacts; ONNX Runtime: one graph per size and identity count;
        TensorRT: a plan per batch bucket (engines/buckets.py, the keys requests look up); torch: none.
        `photos`: FaceID-Portrait's photo counts per person (each count its own token count)."""
        if list(photos) != [1] and not self.adapter.kind.per_photo:
            raise BadInput("warm-up photo counts are for FaceID-Portrait (each photo its own tokens); this adapter "
                           "fuses a person's photos into one set of tokens")
        if self.backend == "torch.compile":
            return self.warm_up_shapes([self.engine_shape(w, h, m, max_images, p)
                                        for w, h in sizes for m in identities for p in photos])
        if self.backend == "torch":
            return {"buckets": 0, "loaded": 0, "stored": 0}
        f, built = self.base.vae_scale_factor, 0
        for width, height in sizes:
            self._check_size(width, height)
            for count in identities:
                for top in engine_buckets(self.backend, 2 * max_images):  # CFG doubles every image
                    for p in photos:
                        self._engine(top, count, height // f, width // f, self.base.tokenizer.model_max_length, None,
                                     self.adapter.identitynet is not None, self.adapter.options.num_tokens * p)
                        built += 1
        return {"buckets": built, "loaded": None, "stored": None}

    def warm_up_shapes(self, shapes: list) -> dict:
        """warm_up for explicit EngineShapes (torch.compile backend)."""
        from ray_faceid.engines.cache import EngineCache
        from ray_faceid.engines.compile_artifacts import compiled_key, warm_up_cached
        from ray_faceid.engines.select import adapter_structure

        structure, model_hash, engine = adapter_structure(self.adapter), self.base.model_hash(), self.compiled_engine()
        if engine.identitynet is not None:  # InstantID: IdentityNet is in the compiled graph too
            structure = f"{structure}+identitynet {engine.identitynet.sha256[:16]} x{engine.identitynet.scale}"
        keys = [compiled_key(model_hash, structure, shape, self.precision, self.device, engine.compiler)
                for shape in shapes]
        return warm_up_cached(engine.compiler, lambda: engine.warm_up(shapes), keys, self.engine_cache or EngineCache())
