"""One module per subcommand, each with ``add_parser(sub, common)`` and ``run(args, console)``.

A new subcommand is a new module here plus its name in ``COMMANDS`` (the order of --help).
"""

COMMANDS: tuple[str, ...] = (
    "list_models", "efficiency", "train", "sweep", "tune", "kernels", "report",
)
