"""The `meshserve` command (main.py), `meshserve up` (launcher.py) and its client commands (commands.py)."""
