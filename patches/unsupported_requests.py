"""Refuse, per request and with a clear message, the sampling features FLEXDRAFT's verification does not reproduce.

Covers `sglang.srt.managers.scheduler.Scheduler._add_request_to_queue` (SGLang 0.5.23), the one place every new
request passes before it is scheduled. FLEXDRAFT accepts drafts against the target's distribution after temperature,
top-k and top-p; penalties, min_p, logit bias, grammars, custom logit processors and per-request seeds would change
that distribution (or its draws) in ways the verify step does not apply, so such output would not be the target's
own. A BEFORE hook marks those requests finished with an error (HTTP 400) instead; the server keeps serving others.
"""

from __future__ import annotations

from . import register

TARGET = "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue"


def unsupported_features(params, custom_logit_processor=None) -> list[str]:
    """The request settings FLEXDRAFT cannot serve losslessly, named as the API names them."""
    found = [name for name, off in (("frequency_penalty", 0.0), ("presence_penalty", 0.0),
                                    ("repetition_penalty", 1.0), ("min_p", 0.0), ("min_new_tokens", 0))
             if getattr(params, name, off) not in (off, None)]
    found += [name for name in ("logit_bias", "json_schema", "regex", "ebnf", "structural_tag", "sampling_seed")
              if getattr(params, name, None) is not None]
    if custom_logit_processor is not None:
        found.append("custom_logit_processor")
    return found


def _refuse_unsupported(scheduler, req, *args, **kwargs):
    if getattr(scheduler.spec_algorithm, "name", None) != "FLEXDRAFT" or req.finished():
        return None
    found = unsupported_features(req.sampling_params, getattr(req, "custom_logit_processor", None))
    if found:
        req.set_finish_with_abort(f"FLEXDRAFT does not support {', '.join(found)} (its verification would not "
                                  "reproduce the target's distribution); serve this request without speculation")
    return None


def register_hooks() -> None:
    register(TARGET, _refuse_unsupported, "BEFORE")
