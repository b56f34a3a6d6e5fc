"""Training FlexDraft adapters (FLEXDRAFT.md, "Training"). So far: the packed mask-block objective."""
