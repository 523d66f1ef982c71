"""The command-line tools: ``python -m seqvis.cli.train`` and the tools that read a trained workdir."""
