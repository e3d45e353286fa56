"""`gemma-export`: the command-line face of model/, exporters/ and validation/."""
