"""Configuration: ``schema`` (the only list of options), ``load`` (YAML + overrides -> a checked Config; each owner's
cross-key rules are called from there), ``resolve`` (what a launch derives). Import from those modules: this package
file stays empty so that reading the schema never loads the checks."""
