"""multibot: a master Claude runs a team of Claude Code workers through typed JSON files."""

__version__ = "0.1.0"
