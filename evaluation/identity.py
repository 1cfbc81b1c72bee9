"""Is everything an evaluation combines about one model? The baseline's weights, the hybrid's layout and the
report's lazy ratios must come from the same weights, not merely the same shape (a base model and its
fine-tune share every name and shape): the fingerprints (:func:`lighttransfer.loading.model_fingerprint`) say."""

from __future__ import annotations

import logging
import os

from ..errors import LightTransferError
from ..loading import compare_fingerprints

log = logging.getLogger(__name__)


def check_same_model(fingerprint: str, *, baseline: str | os.PathLike[str], hcfg=None, hybrid=None, report=None,
                     report_name: str | None = None) -> None:
    """Refuse a hybrid or a report that belongs to other weights than ``baseline`` (whose fingerprint is
    ``fingerprint``); log a warning for ones written before fingerprints covered weight values.

    Raises:
        LightTransferError: naming the hybrid or report, and what to pass instead.
    """
    if hcfg is not None:
        if hcfg.head_order:
            raise LightTransferError(
                f"hybrid '{hybrid}' was saved from a loaded model whose KV heads the runtime reordered (config.json's "
                "lighttransfer.head_order), so its head masks do not index the baseline's heads; evaluate the "
                "checkpoint that `lighttransfer convert` wrote."
            )
        recorded = (hcfg.source or {}).get("fingerprint")
        match = compare_fingerprints(recorded, fingerprint) if recorded else "legacy"
        if match == "different":
            raise LightTransferError(
                f"hybrid '{hybrid}' was converted from '{(hcfg.source or {}).get('model_id', '?')}' (fingerprint "
                f"{recorded}), not from baseline '{baseline}' (fingerprint {fingerprint}): other weights, maybe of "
                "the same shape; pass the model the hybrid was converted from as --baseline."
            )
        if match == "legacy":
            log.warning("hybrid '%s' predates weight fingerprints: its shape matches baseline '%s', its weights "
                        "could not be compared; reconvert it to be sure", hybrid, baseline)
    if report is not None:
        if isinstance(report, (str, os.PathLike)):
            from ..analysis import AnalysisReport

            report_obj, name = AnalysisReport.load(report), str(report)
        else:
            report_obj, name = report, report_name or getattr(report, "model_id", "the report")
        recorded = getattr(report_obj, "fingerprint", None)
        match = compare_fingerprints(recorded, fingerprint) if recorded else "unknown"
        if match == "different":
            raise LightTransferError(
                f"report '{name}' was made for '{getattr(report_obj, 'model_id', '?')}' (fingerprint {recorded}), not "
                f"for baseline '{baseline}' (fingerprint {fingerprint}); run `lighttransfer analyze` on the baseline "
                "or pass its report."
            )
        if match == "legacy":
            log.warning("report '%s' predates weight fingerprints: it matches the shape of '%s', not necessarily "
                        "its weights; rerun `lighttransfer analyze` to be sure", name, baseline)


__all__ = ["check_same_model"]
