"""FlexDraft's math as pure functions over tensors: layouts, masks, sampling, acceptance, confidence, policy.
No model or framework objects here; every engine (reference, trainer, SGLang worker) is glue around these."""
