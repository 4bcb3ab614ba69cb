"""Operations: one module per command's logic. No typer, no printing, no exiting."""
