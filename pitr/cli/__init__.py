"""The command line: argument parsing, settings, output rendering, exit codes. Nothing below imports it."""
