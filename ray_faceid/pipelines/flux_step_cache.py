"""An optional step cache for FLUX (first-block caching, as ParaAttention's and diffusers'
FirstBlockCache): at each step the first dual-stream block runs; where its residual (its output
minus its input) moved less than `threshold` (mean absolute change over the residual's mean
magnitude) since the last step the whole transformer ran, the other blocks are not run and their
residual from that step is added instead. Fewer block passes, a slightly different image: how
different, and how much identity it keeps, is measured by benchmarks/flux_generate.py.

The cache is per call and per row: a call's state lives in its own StepCache (never on the
transformer, which other requests use between this one's steps), and each row decides from its own
residual, so a row's image is the one it gets alone whoever shares its batch. The other blocks run
for the whole batch when any row needs them; a row that could reuse keeps its cached residual.

FluxStages runs diffusers' FluxTransformer2DModel modules in its own forward's order, split after
the first block: with no cache the velocity equals the transformer's (tested)."""
from __future__ import annotations

import torch
from torch import nn


class FluxStages(nn.Module):
    """The transformer's forward in two parts: `head` (embeddings and the first dual-stream block),
    `tail` (the other blocks); `out` the final norm and projection. Each a module torch.compile can
    compile alone."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        self.head, self.tail = _Head(transformer), _Tail(transformer)

    def out(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.transformer.proj_out(self.transformer.norm_out(hidden, temb))


class _Head(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, pooled_projections, encoder_hidden_states, txt_ids, img_ids,
                guidance=None, joint_attention_kwargs=None):
        t = self.transformer
        hidden = t.x_embedder(hidden_states)
        timestep = timestep.to(hidden.dtype) * 1000
        if guidance is None:
            temb = t.time_text_embed(timestep, pooled_projections)
        else:
            temb = t.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled_projections)
        encoder = t.context_embedder(encoder_hidden_states)
        rotary = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        before = hidden
        encoder, hidden = t.transformer_blocks[0](hidden_states=hidden, encoder_hidden_states=encoder, temb=temb,
                                                  image_rotary_emb=rotary, joint_attention_kwargs=joint_attention_kwargs)
        return hidden, encoder, temb, rotary, hidden - before


class _Tail(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden, encoder, temb, rotary, joint_attention_kwargs=None):
        t = self.transformer
        for block in [*list(t.transformer_blocks)[1:], *t.single_transformer_blocks]:
            encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb,
                                    image_rotary_emb=rotary, joint_attention_kwargs=joint_attention_kwargs)
        return hidden


class StepCache:
    """One denoising call's cache: each row's first-block residual and the other blocks' residual at
    the last step the whole transformer ran for it; `reused[k]`: the steps row k took from it."""

    def __init__(self, threshold: float, rows: int):
        self.threshold, self.reused = threshold, [0] * rows
        self.first: torch.Tensor | None = None
        self.rest: torch.Tensor | None = None

    def __call__(self, head, tail, stages: FluxStages, **inputs) -> tuple[torch.Tensor]:
        """The velocity of one step, as the transformer's call returns it ((velocity,)); `head` and
        `tail`: the stages to run (compiled or not)."""
        identity = inputs.pop("joint_attention_kwargs", None)
        inputs.pop("return_dict", None)
        hidden, encoder, temb, rotary, first = head(**inputs, joint_attention_kwargs=identity)
        if self.first is None:
            reuse = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        else:
            change = (first - self.first).abs().mean(dim=(1, 2)) / self.first.abs().mean(dim=(1, 2)).clamp_min(1e-12)
            reuse = change < self.threshold
        if bool(reuse.all()):
            hidden = hidden + self.rest
        else:
            ran = tail(hidden, encoder, temb, rotary, joint_attention_kwargs=identity)
            rest = ran - hidden
            if bool(reuse.any()):  # rows that could reuse keep theirs: a row's image is its own
                keep = reuse.view(-1, 1, 1)
                ran = torch.where(keep, hidden + self.rest, ran)
                rest, first = torch.where(keep, self.rest, rest), torch.where(keep, self.first, first)
            self.rest, self.first = rest, first
            hidden = ran
        for k in torch.nonzero(reuse).flatten().tolist():
            self.reused[k] += 1
        return (stages.out(hidden, temb),)
