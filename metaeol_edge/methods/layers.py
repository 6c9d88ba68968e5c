"""Which hidden state to read: a user's layer choice, resolved against a model's depth.

One convention for every backend (the llama.cpp engine, the PyTorch reference):
``FINAL`` (-1) is the final layer after the final norm, what the paper and
llama.cpp's LAST pooling read; ``k`` in ``1..n_layer`` is the output of
transformer block k before any final norm (Hugging Face ``hidden_states[k]``,
llama.cpp tensor ``l_out-(k-1)``).
"""

from __future__ import annotations

from collections.abc import Sequence

FINAL = -1
"""The layer index of the final-norm state (what LAST pooling and the paper use)."""

LayerSpec = int | float | str
"""A layer as a user gives it: -1, a block number, -j from the end, a fraction, or a string of one."""


def resolve_layer(spec: LayerSpec, n_layer: int) -> int:
    """Turn a user's layer choice into ``FINAL`` (-1) or a block number ``1..n_layer``.

    ``-1``: the final layer after the final norm. ``k`` in ``1..n_layer``: the
    output of transformer block k. ``-j`` for j >= 2 counts from the end as
    ``hidden_states[-j]`` does (-2 is block n_layer-1). A fraction in (0, 1] is
    that share of the depth, rounded, at least block 1.
    """
    if isinstance(spec, str):
        text = spec.strip()
        try:
            spec = int(text)
        except ValueError:
            try:
                spec = float(text)
            except ValueError:
                raise ValueError(f"layer must be an integer or a fraction of the depth, not {text!r}") from None
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


def resolve_layers(spec: LayerSpec | Sequence[LayerSpec], n_layer: int) -> tuple[tuple[int, ...], bool]:
    """One layer choice or a list of them -> (resolved layers, whether a list was given)."""
    many = isinstance(spec, list | tuple)
    specs = list(spec) if many else [spec]  # type: ignore[arg-type]
    if not specs:
        raise ValueError("layer list is empty")
    return tuple(resolve_layer(s, n_layer) for s in specs), many


def check_resolved(layers: Sequence[int], n_layer: int) -> None:
    """Refuse a layer that is neither FINAL nor a block number of this model (what a backend is given)."""
    for layer in layers:
        if layer != FINAL and not 1 <= layer <= n_layer:
            raise ValueError(f"layer {layer} is not FINAL or a block number 1..{n_layer}")


def early_exit_blocks(layers: Sequence[int], n_layer: int, enabled: bool = True) -> int | None:
    """How many blocks a model truncated for these layers keeps, or None when the whole model must run."""
    top = max(layers)
    return top if enabled and FINAL not in layers and top < n_layer else None
