"""Output shared by the operator commands: aligned tables and the --format option."""

import click


def echo_table(table):
    """Print rows (the first is the header) in aligned columns."""
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


# --format of every listing command: aligned columns, or JSON for scripts.
format_option = click.option("--format", "fmt", type=click.Choice(["plain", "json"]), default="plain")
