"""The rules of momentum textual inversion as pure functions (docs/method.md, "Momentum textual inversion").

For a placeholder token p with frozen row e_p of the text encoder's token table and trainable vectors
v, the vector placed at p is ``e = e_p + gamma * (v - e_p)`` with gamma in [0, 1]: gamma = 1 is plain
textual inversion, gamma = 0 the frozen model. Placeholders and init words are single CLIP tokens.
The tokenizer is any object with ``encode(text) -> ids`` and ``decode(ids) -> text``.
"""
from __future__ import annotations

import torch

# The documented defaults of the method's settings, used wherever a setting is left out (flags have none).
DEFAULT_GAMMA = 0.1  # the original code's momentum ratio
DEFAULT_PLACEHOLDER = "*"  # the embedding's placeholder token
DEFAULT_IDENTIFIER = "sks"  # DreamBooth's rare word for the subject


def check_gamma(gamma: float) -> float:
    """The momentum ratio as a float; ValueError outside [0, 1]."""
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1] (1 = plain textual inversion, 0 = frozen model), got {gamma}")
    return float(gamma)


def mix_vectors(e_p: torch.Tensor, v: torch.Tensor, gamma: float) -> torch.Tensor:
    """e = e_p + gamma * (v - e_p), elementwise (same shapes, e.g. [n, D]).

    ``torch.lerp`` is exact at the ends: gamma = 1 gives v (plain TI) and gamma = 0 gives e_p.
    e_p and v of different dtypes are first brought to their common one.
    """
    dtype = torch.promote_types(e_p.dtype, v.dtype)
    return torch.lerp(e_p.to(dtype), v.to(dtype), gamma)


STRENGTH_RANGE = (0.0, 4.0)


def check_strength(strength: float) -> float:
    """The inference strength as a float; ValueError outside :data:`STRENGTH_RANGE`."""
    low, high = STRENGTH_RANGE
    if not low <= float(strength) <= high:
        raise ValueError(f"strength must be in [{low:g}, {high:g}] (1 = as trained, 0 = the placeholder's own "
                         f"row e_p), got {strength}")
    return float(strength)


def scale_offset(e_p: torch.Tensor, e: torch.Tensor, strength: float) -> torch.Tensor:
    """Inference strength: e_s = e_p + strength * (e - e_p), elementwise (exact e at 1, e_p at 0).

    Since e is affine in v with fixed point e_p, the same formula on v gives the v whose mix is e_s.
    """
    return mix_vectors(e_p, e, check_strength(strength))


def single_token_id(tokenizer, text: str, role: str) -> int:
    """The id of ``text`` if it is exactly one token, else a ValueError naming ``role`` and showing its tokens."""
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(
            f"{role} '{text}' must be a single CLIP token but tokenizes to {len(ids)}: {pieces} (ids {ids}); "
            f"choose a one-token string (e.g. '*' or 'sks' for a placeholder, 'woman' for an init word)"
        )
    return ids[0]


def single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` if it is exactly one token, else None (:func:`single_token_id` without the error)."""
    try:
        return single_token_id(tokenizer, text, "text")
    except ValueError:
        return None


# --- anchoring options (docs/method.md, "Anchoring"): where e may go and where it starts ---------------
ANCHORS = ("init", "e_p")  # the start e_0 = e_p + gamma (v_0 - e_p), or the placeholder's own row e_p


def check_anchor_weight(weight: float) -> float:
    """The weight of the pull toward the anchor as a float; ValueError (naming the setting) when negative."""
    if not float(weight) >= 0.0:
        raise ValueError(f"anchor_weight must be >= 0 (0 = off), got {weight}")
    return float(weight)


def check_ema_decay(decay: float) -> float:
    """The decay of the embedding's moving average as a float; ValueError (naming the setting) outside [0, 1)."""
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0 = off, e.g. 0.99), got {decay}")
    return float(decay)


def check_anchor(anchor: str) -> str:
    """The anchor's name; ValueError (naming the setting) unless one of :data:`ANCHORS`."""
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {', '.join(ANCHORS)}, got {anchor!r}")
    return anchor


def vector_norms(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each vector of ``x`` [..., D]: [...], with gradient 0 (not NaN) at a zero vector.

    The square root is taken of the squared norm clamped away from zero, so the loss
    ``||e - anchor||`` at its minimum (the first step of ``--anchor init``) has a finite gradient.
    """
    squared = (x * x).sum(-1)
    return torch.where(squared > 0, squared.clamp_min(torch.finfo(x.dtype).tiny).sqrt(), torch.zeros_like(squared))


def unmix_vectors(e_p: torch.Tensor, e: torch.Tensor, gamma: float) -> torch.Tensor:
    """The v whose mix is ``e``: v = e_p + (e - e_p) / gamma (the inverse of :func:`mix_vectors`, gamma > 0)."""
    if gamma <= 0:
        raise ValueError("at gamma 0 every v gives e = e_p: there is no v to solve for")
    return e_p + (e - e_p) / gamma


def rescale_to_norms(e: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Each vector of ``e`` [..., D] scaled to the norm in ``norms`` [...] (a zero vector stays zero)."""
    current = vector_norms(e)
    scale = torch.where(current > 0, norms / current.clamp_min(torch.finfo(e.dtype).tiny), torch.ones_like(current))
    return e * scale.unsqueeze(-1)
