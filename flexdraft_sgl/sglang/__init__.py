"""FLEXDRAFT inside SGLang 0.5.23: the plugin entry point, the spec class, the worker and its mask-row drafter.
Nothing here is imported unless SGLang is installed and loads the plugin."""
