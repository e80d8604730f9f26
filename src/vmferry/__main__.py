"""``python -m vmferry``: the same CLI as the ``vmferry`` console script."""

from vmferry.cli.main import main

if __name__ == "__main__":
    main()
