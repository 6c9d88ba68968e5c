"""Which hidden state to read: a user's layer choice, resolved against a model's depth.

One convention for every backend (the llama.cpp engine, the PyTorch reference):
``FINAL`` (-1) is the final layer after the final norm, what the paper and
llama.cpp's LAST pooling read; ``k`` in ``1..n_layer`` is the output of
transformer block k before any final norm (Hugging Face ``hidden_states[k]``,
llama.cpp tensor ``l_out-(k-1)``).

A read may also be an attention span, ``"attn:22-30"``: the attention outputs
of blocks 22 to 30 at the read token, averaged (each block's attention after its
output projection, before the residual add: llama.cpp's ``attn_out-(k-1)``,
Hugging Face's ``self_attn`` output). That is AlignedWVA (Zhang et al.,
arXiv 2602.01572): the last token's attention weights weigh the value vectors
and W_O maps them into the residual stream's space. A resolved span is the
string in that one spelling; a hidden-state read stays an int.
"""

from __future__ import annotations

from collections.abc import Sequence

FINAL = -1
"""The layer index of the final-norm state (what LAST pooling and the paper use)."""

LayerSpec = int | float | str
"""A layer as a user gives it: -1, a block number, -j from the end, a fraction, a string of one, or an
attention span ``"attn:A-B"``."""

Read = int | str
"""A resolved read: ``FINAL``, a block number, or an attention span in its one spelling (``"attn:22-30"``)."""

ATTENTION = "attn:"


def attention_span(read: Read) -> tuple[int, int] | None:
    """(first, last) block of an attention span read, or None for a hidden-state read."""
    if not isinstance(read, str):
        return None
    first, _, last = read.removeprefix(ATTENTION).partition("-")
    return int(first), int(last)


def attention_blocks(read: Read) -> range:
    """The blocks whose attention outputs a read averages: a span's, none for a hidden-state read."""
    span = attention_span(read)
    return range(0) if span is None else range(span[0], span[1] + 1)


def _resolve_span(text: str, n_layer: int) -> str:
    body = text[len(ATTENTION) :].strip()
    first_text, dash, last_text = body.partition("-")
    try:
        first, last = int(first_text), int(last_text if dash else first_text)
    except ValueError:
        raise ValueError(
            f"an attention span is attn:FIRST-LAST (blocks, e.g. attn:22-30) or attn:K, not {text!r}"
        ) from None
    if not 1 <= first <= last <= n_layer:
        raise ValueError(f"attention span {text!r} must lie within blocks 1..{n_layer}, first <= last")
    return f"{ATTENTION}{first}-{last}"


def top_block(read: Read, n_layer: int) -> int:
    """The highest block a read needs computed (the whole model for ``FINAL``)."""
    span = attention_span(read)
    if span is not None:
        return span[1]
    return n_layer if read == FINAL else int(read)


def resolve_layer(spec: LayerSpec, n_layer: int) -> Read:
    """Turn a user's layer choice into ``FINAL`` (-1), a block number ``1..n_layer`` or an attention span.

    ``-1``: the final layer after the final norm. ``k`` in ``1..n_layer``: the
    output of transformer block k. ``-j`` for j >= 2 counts from the end as
    ``hidden_states[-j]`` does (-2 is block n_layer-1). A fraction in (0, 1] is
    that share of the depth, rounded, at least block 1. ``"attn:A-B"`` (or
    ``"attn:K"``): the attention span of blocks A..B, returned as ``"attn:A-B"``.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith(ATTENTION):
            return _resolve_span(text, n_layer)
        try:
            spec = int(text)
        except ValueError:
            try:
                spec = float(text)
            except ValueError:
                raise ValueError(
                    f"layer must be an integer, a fraction of the depth or attn:FIRST-LAST, not {text!r}"
                ) from None
    if isinstance(spec, bool) or not isinstance(spec, int | float):
        raise ValueError(f"layer must be an integer or a fraction of the depth, not {spec!r}")
    if isinstance(spec, float):
        if spec.is_integer() and spec not in (0.0, 1.0):
            spec = int(spec)
        elif 0.0 < spec <= 1.0:
            return max(1, min(n_layer, round(spec * n_layer)))
        else:
            raise ValueError(f"a fractional layer must lie in (0, 1], not {spec}")
    if spec == FINAL:
        return FINAL
    if 1 <= spec <= n_layer:
        return spec
    if -n_layer <= spec <= -2:
        return n_layer + 1 + spec
    raise ValueError(
        f"layer {spec} is out of range for a model of {n_layer} blocks: use -1 (final), 1..{n_layer}, "
        f"-{n_layer}..-2, or a fraction such as 0.8"
    )


def resolve_layers(spec: LayerSpec | Sequence[LayerSpec], n_layer: int) -> tuple[tuple[Read, ...], bool]:
    """One layer choice or a list of them -> (resolved layers, whether a list was given)."""
    many = isinstance(spec, list | tuple)
    specs = list(spec) if many else [spec]  # type: ignore[arg-type]
    if not specs:
        raise ValueError("layer list is empty")
    return tuple(resolve_layer(s, n_layer) for s in specs), many


def check_resolved(layers: Sequence[Read], n_layer: int) -> None:
    """Refuse a read that is neither FINAL, a block number of this model nor a resolved attention span of its
    blocks (what a backend is given)."""
    for layer in layers:
        if isinstance(layer, str):
            try:
                resolved = layer.startswith(ATTENTION) and _resolve_span(layer, n_layer) == layer
            except ValueError:
                resolved = False
            if not resolved:
                raise ValueError(f"read {layer!r} is not an attention span attn:FIRST-LAST within 1..{n_layer}")
        elif layer != FINAL and not 1 <= layer <= n_layer:
            raise ValueError(f"layer {layer} is not FINAL or a block number 1..{n_layer}")


def early_exit_blocks(layers: Sequence[Read], n_layer: int, enabled: bool = True) -> int | None:
    """How many blocks a model truncated for these layers keeps, or None when the whole model must run."""
    top = max(top_block(layer, n_layer) for layer in layers)
    return top if enabled and FINAL not in layers and top < n_layer else None
