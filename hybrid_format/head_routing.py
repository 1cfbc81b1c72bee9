"""Head routing of the full layers' decode steps, as stored in the checkpoint block (``"head_routing": {...}``).

Per decode query, each KV head of a full layer attends either sink + window of its full cache (routed *local*) or
every key (routed *full*); the rule is :mod:`lighttransfer.kernels.head_routing` (QAdA, arXiv 2502.09647). The block
is optional and versioned on its own (``schema_version``), like ``sparse_prefill``, so blocks without it load as
before (and readers that do not know it refuse it as an unknown key instead of silently decoding densely)::

    "head_routing": {"schema_version": 1, "mode": "qada", "tau": 0.05, "layer_tau": {"3": 0.02, ...},
                     "share": null, "stats": "bulk", "cov": "full", "sink": null, "window": null, "seed": 0,
                     "local_masks": {}}

``guard`` (``"pages"``: a page-max bound that turns a head full when one page of bulk keys could alone carry more
than ``tau`` of the attention, :mod:`lighttransfer.kernels.routing_guard`; ``"heads"``: the KV heads of
``full_masks``, e.g. those found long-context offline, always attend every key), ``page`` (bulk keys per page) and
``full_masks`` are written only when set: a block without a guard stays readable by versions that predate the
field, and one with a guard is refused by them as an unknown key (instead of routing unguarded).

Modes: ``qada`` (the Gaussian prediction of the far share against ``tau``), ``oracle`` (the exact far share against
``tau``: evaluation only, it reads every key), ``random`` (each (sequence, KV head) local with probability
``share``), ``static`` (a fixed set of local KV heads per layer, ``local_masks``: head gates or any offline choice,
applied at decode only). ``sink``/``window`` default to the layout's (the hybrid's own, else 4 / 1020).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LightTransferError

HEAD_ROUTING_SCHEMA_VERSION = 1
ROUTING_MODES = ("qada", "oracle", "random", "static")
ROUTING_STATS = ("bulk", "local")
ROUTING_COVARIANCES = ("full", "diag")
ROUTING_GUARDS = ("none", "pages", "heads")
DEFAULT_ROUTING_PAGE = 64  # the same as kernels.routing_guard.DEFAULT_PAGE


@dataclass(frozen=True)
class HeadRoutingConfig:
    """How the full layers route their KV heads at decode.

    Attributes:
        mode: ``qada``, ``oracle``, ``random`` or ``static`` (see the module docstring).
        tau: far-share threshold of ``qada``/``oracle`` in ``[0, 1]``: a KV head goes local when every one of its
            query heads has a far share ``<= tau``.
        layer_tau: ``{layer: tau}`` per layer (from :func:`lighttransfer.runtime.calibrate_head_routing`); layers
            absent use ``tau``.
        share: ``random``: probability that a (sequence, KV head) goes local, in ``[0, 1]``.
        stats: ``bulk`` (the Gaussian's moments from the bulk keys, kept as keys leave the window) or ``local``
            (from the window keys only).
        cov: ``full`` (``Σ kkᵀ``, head_dim² floats per KV head) or ``diag`` (``Σ k²``).
        sink, window: the local set of a routed-local head (``None``: the layout's sink and window).
        seed: seed of the ``random`` mode's generator.
        local_masks: ``static``: ``{layer: [bool] * kv_heads}``, True = that KV head always goes local; layers
            absent stay full.
        guard: ``qada`` only: ``none`` (the Gaussian alone), ``pages`` (also full when a page's score bound says
            one page of bulk keys could take more than ``tau`` of the attention on its own) or ``heads`` (the KV
            heads of ``full_masks`` always full, QAdA deciding the others).
        page: ``pages`` guard: key indices per page (``None``: 64).
        full_masks: ``heads`` guard: ``{layer: [bool] * kv_heads}``, True = that KV head always attends every key
            (its far share counts as infinite, so no threshold routes it local); layers absent have none.
    """

    mode: str = "qada"
    tau: float | None = None
    layer_tau: dict[int, float] = field(default_factory=dict)
    share: float | None = None
    stats: str = "bulk"
    cov: str = "full"
    sink: int | None = None
    window: int | None = None
    seed: int = 0
    local_masks: dict[int, list[bool]] = field(default_factory=dict)
    guard: str = "none"
    page: int | None = None
    full_masks: dict[int, list[bool]] = field(default_factory=dict)
    schema_version: int = HEAD_ROUTING_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != HEAD_ROUTING_SCHEMA_VERSION:
            raise LightTransferError(f"head_routing schema_version {self.schema_version} is not supported (this "
                                     f"lighttransfer reads {HEAD_ROUTING_SCHEMA_VERSION}); upgrade lighttransfer.")
        if self.mode not in ROUTING_MODES:
            raise LightTransferError(f"head_routing {self.mode!r} is not known; use one of {', '.join(ROUTING_MODES)} "
                                     "(or None for dense decoding).")
        if self.stats not in ROUTING_STATS:
            raise LightTransferError(f"routing_stats must be one of {', '.join(ROUTING_STATS)}, got {self.stats!r}.")
        if self.cov not in ROUTING_COVARIANCES:
            raise LightTransferError(f"routing_cov must be one of {', '.join(ROUTING_COVARIANCES)}, got {self.cov!r}.")
        if self.guard not in ROUTING_GUARDS:
            raise LightTransferError(f"routing_guard must be one of {', '.join(ROUTING_GUARDS)}, got {self.guard!r}.")
        if self.page is not None and (isinstance(self.page, bool) or not isinstance(self.page, int) or self.page < 1):
            raise LightTransferError(f"routing_page must be a whole number >= 1 (keys per page), got {self.page!r}.")
        if self.page is not None and self.guard == "none":
            raise LightTransferError("routing_page needs routing_guard='pages' (without a guard it does nothing).")
        if self.guard != "none" and self.mode != "qada":
            raise LightTransferError(f"routing_guard {self.guard!r} applies to head_routing 'qada' only, not "
                                     f"{self.mode!r}.")
        object.__setattr__(self, "layer_tau", {int(k): _share(v, "routing layer_tau") for k, v in
                                               dict(self.layer_tau).items()})
        object.__setattr__(self, "local_masks", {int(k): [bool(x) for x in v] for k, v in
                                                 dict(self.local_masks).items()})
        object.__setattr__(self, "full_masks", {int(k): [bool(x) for x in v] for k, v in
                                                dict(self.full_masks).items()})
        if self.guard == "heads" and not any(map(any, self.full_masks.values())):
            raise LightTransferError("routing_guard 'heads' needs routing_full_heads ({layer: [bool] * kv_heads}, "
                                     "True = always full) with at least one KV head.")
        if self.full_masks and self.guard != "heads":
            raise LightTransferError("routing_full_heads needs routing_guard='heads' (without it they do nothing).")
        if self.tau is not None:
            object.__setattr__(self, "tau", _share(self.tau, "routing_tau"))
        if self.share is not None:
            object.__setattr__(self, "share", _share(self.share, "routing_share"))
        for name, least in (("sink", 0), ("window", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise LightTransferError(f"routing_{name} must be a whole number >= {least}, got {value!r}.")
        if self.mode in ("qada", "oracle") and self.tau is None and not self.layer_tau:
            raise LightTransferError(f"head_routing {self.mode!r} needs routing_tau (a far-share threshold in "
                                     "[0, 1]) or per-layer thresholds from calibrate_head_routing().")
        if self.mode == "random" and self.share is None:
            raise LightTransferError("head_routing 'random' needs routing_share (the local share in [0, 1]).")
        if self.mode == "static" and not self.local_masks:
            raise LightTransferError("head_routing 'static' needs local_masks ({layer: [bool] * kv_heads}).")

    def tau_for(self, layer: int) -> float:
        """The threshold of ``layer`` (``qada``/``oracle``): its own, else the global one (else 0: all full)."""
        return self.layer_tau.get(layer, self.tau if self.tau is not None else 0.0)

    @property
    def page_size(self) -> int:
        """Key indices per page of the ``pages`` guard."""
        return DEFAULT_ROUTING_PAGE if self.page is None else self.page

    def describe(self) -> str:
        if self.mode == "random":
            how = f"share {self.share:g}, seed {self.seed}"
        elif self.mode == "static":
            how = f"{sum(map(sum, self.local_masks.values()))} KV heads always local"
        else:
            how = f"tau {self.tau:g}" if not self.layer_tau else f"tau per layer ({len(self.layer_tau)} layers)"
            if self.mode == "qada":
                how += f", {self.stats} stats, {self.cov} covariance"
                if self.guard == "pages":
                    how += f", page guard (P={self.page_size})"
                elif self.guard == "heads":
                    how += f", {sum(map(sum, self.full_masks.values()))} KV heads always full"
        return f"head routing {self.mode} ({how})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_tau"] = {str(k): v for k, v in sorted(self.layer_tau.items())}
        d["local_masks"] = {str(k): v for k, v in sorted(self.local_masks.items())}
        d["full_masks"] = {str(k): v for k, v in sorted(self.full_masks.items())}
        for name, default in (("guard", "none"), ("page", None), ("full_masks", {})):
            if d[name] == default:
                del d[name]  # the defaults: such blocks stay readable by versions that predate the fields
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadRoutingConfig:
        if not isinstance(d, dict):
            raise LightTransferError("head_routing must be an object.")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise LightTransferError(f"unknown keys in head_routing: {sorted(unknown)}.")
        return cls(**d)


def _share(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise LightTransferError(f"{name} must be in [0, 1], got {value!r}.")
    return float(value)


__all__ = ["HeadRoutingConfig", "ROUTING_MODES", "ROUTING_STATS", "ROUTING_COVARIANCES", "ROUTING_GUARDS",
           "DEFAULT_ROUTING_PAGE",
           "HEAD_ROUTING_SCHEMA_VERSION"]
