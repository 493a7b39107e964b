"""Output helpers shared by the operator commands."""

import click


def echo_table(table):
    """Print rows (the first is the header) in aligned columns."""
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
