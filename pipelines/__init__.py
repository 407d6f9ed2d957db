"""Jobs users submit: `python -m pipelines.<name> --config <yaml> [key=value ...]`."""
